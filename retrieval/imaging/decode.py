"""Decode image files into normalised grayscale pixels, and fit them to the model's input size.

Contract of this module (it never imports torch, so decode worker processes stay light):

* :func:`decode_path` / :func:`decode_bytes` return a :class:`DecodedImage` whose ``pixels`` are a
  2-D ``float32`` array in ``[0, 1]``, plus the DICOM dataset header (without pixel data) when the
  source is DICOM.
* Raster images (PNG, JPEG, TIFF, BMP, ... through Pillow): 8/16/32-bit grayscale, RGB(A), CMYK and
  palette. Colour is reduced to luminance (ITU-R 601), alpha is dropped, 16-bit values are read as
  integers (never wrapped through an 8-bit conversion); then min-max scaled to ``[0, 1]``, as the
  ``medvae`` package's own 2-D loader does (``ScaleIntensity(minv=0, maxv=1)``).
  A PNG's image data is inflated by libdeflate, then unfiltered by Pillow (:mod:`.png_repack`): Pillow's
  pixels, about twice as fast for a 16-bit radiograph.
* DICOM: modality LUT (rescale slope/intercept or LUT) -> VOI LUT sequence, else the first window
  centre/width (LINEAR, LINEAR_EXACT or SIGMOID), else 0.5/99.5 percentile clipping ->
  MONOCHROME1 inverted so that dense structures are bright. Colour DICOM (RGB, YBR, palette) is
  converted to RGB, then luminance. **Multi-frame: the first frame only** is decoded (the frame
  count is reported in ``frames``); one image row per file keeps the "same file = same image"
  rule of incremental ingest simple.
* Pixel-count caps are enforced *before* decoding: Pillow's decompression-bomb warning is an
  error, and DICOM ``Rows x Columns x Frames x Samples`` is checked from the header alone.
* ``keep_stored_values=True`` (ingest fitting on the encoder's device, decision 36): a grayscale raster
  or a MONOCHROME DICOM with a rescale and a window is returned as its stored integers, with the
  :class:`UnitMap` that takes them to [0, 1] (min-max, or rescale -> window -> invert), to be applied
  where the image is fitted (:func:`retrieval.imaging.device_fit.fit_frame`); everything else is
  mapped here as always and its ``unit`` is :data:`IN_UNIT`.
* ``pass_encoded`` (ingest decoding compressed DICOM on the encoder's GPU, decision 39): a DICOM frame that
  ``keep_stored_values`` would hand over, stored in one of these transfer syntaxes, unsigned, 8 or 16 bits
  allocated, is not decoded here: its compressed bytes come back as :class:`EncodedFrame` (``pixels`` is None),
  for :mod:`retrieval.imaging.device_codec` to decode where the frame is fitted.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from retrieval.errors import ImageDecodeError, ImageTooLargeError
from retrieval.imaging.decode_gate import decoding
from retrieval.imaging.png_repack import repack_png

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".pgm", ".ppm"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Truncated files must fail, never decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class UnitMap:
    """The elementwise map from a frame's stored values to its [0, 1] pixels, as this module applies it.

    ``unit``: the values are the pixels already. ``minmax``: :func:`minmax_scale`. ``window``: DICOM's
    rescale (``values * slope + intercept``; slope 1, intercept 0 when the file has no rescale), then
    :func:`apply_window` with ``center``, ``width`` and ``function``, then ``1 - x`` when ``invert``
    (MONOCHROME1). Small and picklable: it travels from a decode worker with the values.
    """

    kind: Literal["unit", "minmax", "window"] = "unit"
    slope: float = 1.0
    intercept: float = 0.0
    center: float = 0.0
    width: float = 1.0
    function: str = "LINEAR"
    invert: bool = False


IN_UNIT = UnitMap()
"""The values are [0, 1] pixels: nothing left to map."""


@dataclass(frozen=True)
class EncodedFrame:
    """A DICOM file's first frame still compressed, with what its decoded values must look like: ``rows`` x
    ``columns`` unsigned integers of ``bits_allocated`` (8 or 16) bits, ``bits_stored`` of them significant.
    Picklable: it travels from a decode worker to the device codec."""

    transfer_syntax: str
    data: bytes = field(repr=False)
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int


@dataclass
class DecodedImage:
    """Normalised pixels of one image and what was learnt while decoding it."""

    pixels: Any  # (H, W) float32 in [0, 1]; with keep_stored_values, the stored values ``unit`` maps there; None for
    # a frame passed on still encoded (``encoded``), or (a query) its stored values decoded on the device, a tensor
    kind: str  # "dicom" or "raster"
    width: int
    height: int
    frames: int = 1
    dicom: Any | None = field(default=None, repr=False)  # pydicom Dataset, header only
    unit: UnitMap = IN_UNIT
    encoded: EncodedFrame | None = None  # pass_encoded: the compressed frame that ``unit`` maps once decoded


def looks_like_dicom(head: bytes) -> bool:
    """True when the bytes carry the DICOM Part 10 preamble marker."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def decode_path(path: str | Path, *, max_pixels: int, keep_stored_values: bool = False,
                pass_encoded: frozenset[str] = frozenset()) -> DecodedImage:
    """Decode one file; raises :class:`ImageDecodeError` naming the file on any failure. ``keep_stored_values``
    and ``pass_encoded`` (transfer syntax UIDs; only with ``keep_stored_values``): see the module's contract."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc.strerror or exc})", detail={"source": str(path)}) from exc
    if not head:
        raise ImageDecodeError(f"{path}: file is empty", detail={"source": str(path)})
    try:
        if looks_like_dicom(head) or path.suffix.lower() in DICOM_SUFFIXES:
            return _decode_dicom(str(path), max_pixels=max_pixels, keep_stored_values=keep_stored_values,
                                 pass_encoded=pass_encoded if keep_stored_values else frozenset())
        return _decode_raster(path, max_pixels=max_pixels, keep_stored_values=keep_stored_values)
    except ImageDecodeError as exc:
        exc.detail.setdefault("source", str(path))
        if not exc.message.startswith(str(path)):
            exc.message = f"{path}: {exc.message}"
            exc.args = (exc.message,)
        raise


def decode_bytes(data: bytes, *, name: str = "upload", max_pixels: int, keep_stored_values: bool = False,
                 pass_encoded: frozenset[str] = frozenset()) -> DecodedImage:
    """Decode an in-memory file (an upload); ``name`` is used in error messages only. ``keep_stored_values`` and
    ``pass_encoded``: as :func:`decode_path`."""
    if not data:
        raise ImageDecodeError(f"{name}: file is empty", detail={"source": name})
    try:
        if looks_like_dicom(data[:132]) or Path(name).suffix.lower() in DICOM_SUFFIXES:
            return _decode_dicom(io.BytesIO(data), max_pixels=max_pixels, keep_stored_values=keep_stored_values,
                                 pass_encoded=pass_encoded if keep_stored_values else frozenset())
        return _decode_raster(io.BytesIO(data), max_pixels=max_pixels, keep_stored_values=keep_stored_values)
    except ImageDecodeError as exc:
        exc.detail.setdefault("source", name)
        exc.message = f"{name}: {exc.message}"
        exc.args = (exc.message,)
        raise


# --------------------------------------------------------------------------- raster


def _decode_raster(source: Path | io.BytesIO, *, max_pixels: int, keep_stored_values: bool = False) -> DecodedImage:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous_cap = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"image is {width}x{height} = {width * height} pixels, above the cap of {max_pixels}",
                        detail={"width": width, "height": height, "max_pixels": max_pixels},
                    )
                with decoding(width * height), _inflated_by_libdeflate(image, source, max_pixels=max_pixels) as loaded:
                    loaded.load()
                    stored = _stored_gray(loaded) if keep_stored_values else None
                    pixels = stored if stored is not None else minmax_scale(_raster_to_gray(loaded))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageTooLargeError(f"image exceeds the pixel cap of {max_pixels}: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageDecodeError("not a recognised image format") from exc
        except ImageDecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageDecodeError(f"corrupt or truncated image ({exc})") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous_cap
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ImageDecodeError("image has no pixels")
    return DecodedImage(pixels=pixels, kind="raster", width=width, height=height,
                        unit=UnitMap(kind="minmax") if stored is not None else IN_UNIT)


@contextlib.contextmanager
def _inflated_by_libdeflate(image: Image.Image, source: Path | io.BytesIO, *, max_pixels: int) -> Iterator[Image.Image]:
    """``image`` (opened, not loaded), or when it is a PNG that :func:`repack_png` applies to, the same file re-packed
    so that libdeflate inflates it and Pillow only unfilters it: the same pixels in about half the time."""
    if image.format != "PNG":
        yield image
        return
    repacked = repack_png(source.getvalue() if isinstance(source, io.BytesIO) else source.read_bytes(),
                          max_pixels=max_pixels)
    if repacked is None:
        yield image
        return
    with Image.open(io.BytesIO(repacked)) as fast:
        yield fast


def _stored_gray(image: Image.Image) -> np.ndarray | None:
    """A grayscale integer image's stored values in native byte order (what min-max maps to [0, 1]); None for
    every other mode, which :func:`_raster_to_gray` converts."""
    if image.mode != "L" and image.mode != "I" and not image.mode.startswith("I;16"):
        return None
    values = np.asarray(image)
    if values.ndim != 2:
        raise ImageDecodeError(f"unexpected pixel array shape {values.shape}")
    return _native_order(values)


def _native_order(values: np.ndarray) -> np.ndarray:
    """``values`` in this machine's byte order (a big-endian 16-bit PNG or DICOM arrives swapped), copied only if needed."""
    return values if values.dtype.isnative else values.astype(values.dtype.newbyteorder("="))


def _raster_to_gray(image: Image.Image) -> np.ndarray:
    """Pixels of any Pillow mode as a float32 (H, W) array in the image's own value range."""
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
        mode = image.mode
    if mode in ("1", "L", "LA"):
        array = np.asarray(image.convert("L"), dtype=np.float32)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image).astype(np.float32)
    elif mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
        array = rgb @ _LUMA
    else:
        raise ImageDecodeError(f"unsupported image mode {mode!r}")
    if array.ndim != 2:
        raise ImageDecodeError(f"unexpected pixel array shape {array.shape}")
    return array


# --------------------------------------------------------------------------- DICOM


def _decode_dicom(source: str | io.BytesIO, *, max_pixels: int, keep_stored_values: bool = False,
                  pass_encoded: frozenset[str] = frozenset()) -> DecodedImage:
    import pydicom

    try:
        header = pydicom.dcmread(source, stop_before_pixels=True, force=True)
        rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
        frames = int(header.get("NumberOfFrames", 1) or 1)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
    except Exception as exc:  # pydicom raises many types on corrupt headers (found by bench/fuzz_decode.py)
        raise ImageDecodeError(f"unreadable DICOM header ({type(exc).__name__}: {exc})") from exc
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError("DICOM has no image (Rows/Columns missing); not an image object")
    declared = rows * cols * samples  # the cap is on what is decoded: the first frame only
    if declared > max_pixels:
        raise ImageTooLargeError(
            f"DICOM declares {rows}x{cols} x{samples} samples = {declared} values per frame, "
            f"above the cap of {max_pixels}",
            detail={"rows": rows, "columns": cols, "frames": frames, "samples": samples, "max_pixels": max_pixels},
        )
    if isinstance(source, io.BytesIO):
        source.seek(0)
    with decoding(declared):
        return _decode_dicom_pixels(source, rows=rows, cols=cols, frames=frames, keep_stored_values=keep_stored_values,
                                    pass_encoded=pass_encoded)


def _decode_dicom_pixels(source: str | io.BytesIO, *, rows: int, cols: int, frames: int,
                         keep_stored_values: bool, pass_encoded: frozenset[str] = frozenset()) -> DecodedImage:
    import pydicom

    try:
        dataset = pydicom.dcmread(source, force=True)
    except Exception as exc:  # pydicom raises a wide range of errors on corrupt files
        raise ImageDecodeError(f"unreadable DICOM ({exc})") from exc
    if "PixelData" not in dataset and "FloatPixelData" not in dataset and "DoubleFloatPixelData" not in dataset:
        raise ImageDecodeError("DICOM has no pixel data")
    if "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    encoded = _still_encoded(dataset, frames, pass_encoded) if pass_encoded else None
    if encoded is not None:
        del dataset.PixelData
        return DecodedImage(pixels=None, kind="dicom", width=cols, height=rows, frames=frames, dicom=dataset,
                            unit=encoded[1], encoded=encoded[0])
    try:
        pixels, unit = _dicom_first_frame(dataset, frames, keep_stored_values=keep_stored_values)
    except ImageDecodeError:
        raise
    except Exception as exc:  # decoder plugins raise their own types
        syntax = getattr(dataset.file_meta.TransferSyntaxUID, "name", str(dataset.file_meta.TransferSyntaxUID))
        raise ImageDecodeError(f"cannot decode pixel data ({syntax}): {exc}") from exc
    del dataset.PixelData
    return DecodedImage(pixels=pixels, kind="dicom", width=cols, height=rows, frames=frames, dicom=dataset, unit=unit)


def _dicom_first_frame(dataset: Any, frames: int, *, keep_stored_values: bool = False) -> tuple[np.ndarray, UnitMap]:
    """The first frame: [0, 1] pixels and :data:`IN_UNIT`, or (``keep_stored_values``, a windowed grayscale
    frame) its stored values and the map that :func:`_voi_to_unit` would apply."""
    from pydicom.pixels import apply_modality_lut, pixel_array

    raw = pixel_array(dataset, index=0 if frames > 1 else None)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2") and keep_stored_values and raw.ndim == 2:
        unit = _window_map(dataset, invert=photometric == "MONOCHROME1")
        if unit is not None:
            return _native_order(raw), unit
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(raw, dataset).astype(np.float32)
        if values.ndim != 2:
            raise ImageDecodeError(f"unexpected grayscale frame shape {values.shape}")
        scaled = _voi_to_unit(values, dataset)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
        return scaled.astype(np.float32), IN_UNIT
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(raw, dataset).astype(np.float32)
    elif photometric.startswith("YBR") or photometric in ("RGB", "ARGB", "CMYK"):
        # pixel_array() has already converted YBR to RGB (raw=False).
        rgb = raw[..., :3].astype(np.float32)
    else:
        raise ImageDecodeError(f"unsupported PhotometricInterpretation {photometric!r}")
    gray = rgb @ _LUMA
    return minmax_scale(gray), IN_UNIT


def _still_encoded(dataset: Any, frames: int, syntaxes: frozenset[str]) -> tuple[EncodedFrame, UnitMap] | None:
    """The first frame's compressed bytes and its map to [0, 1], when a device codec is to decode it: a transfer
    syntax in ``syntaxes``, one sample of MONOCHROME1/2, unsigned, 8 or 16 bits allocated, a rescale-and-window
    map (:func:`_window_map`); else None (decoded here). A frame whose fragments cannot be found is decoded here
    too, where pydicom's error names the problem."""
    from pydicom.encaps import get_frame

    syntax = str(dataset.file_meta.TransferSyntaxUID)
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    bits_allocated = int(dataset.get("BitsAllocated", 0) or 0)
    if (syntax not in syntaxes or photometric not in ("MONOCHROME1", "MONOCHROME2") or "PixelData" not in dataset
            or int(dataset.get("SamplesPerPixel", 1) or 1) != 1 or int(dataset.get("PixelRepresentation", 0) or 0) != 0
            or bits_allocated not in (8, 16)):
        return None
    unit = _window_map(dataset, invert=photometric == "MONOCHROME1")
    if unit is None:
        return None
    try:
        data = get_frame(dataset.PixelData, 0, number_of_frames=frames)
    except Exception:  # noqa: BLE001 - malformed encapsulation: pydicom's own decode reports it
        return None
    frame = EncodedFrame(transfer_syntax=syntax, data=bytes(data), rows=int(dataset.Rows), columns=int(dataset.Columns),
                         bits_allocated=bits_allocated, bits_stored=int(dataset.get("BitsStored", bits_allocated) or bits_allocated))
    return frame, unit


def _window_map(dataset: Any, *, invert: bool) -> UnitMap | None:
    """The rescale + window map of a grayscale frame, when that is all its modality and VOI transforms are (no
    LUT sequence, a window of positive width); else None (the frame is mapped on the CPU)."""
    if "ModalityLUTSequence" in dataset or "VOILUTSequence" in dataset:
        return None
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
    if not width > 0:
        return None
    rescaled = "RescaleSlope" in dataset and "RescaleIntercept" in dataset  # pydicom's apply_modality_lut rule
    return UnitMap(
        kind="window",
        slope=float(dataset.RescaleSlope) if rescaled else 1.0,
        intercept=float(dataset.RescaleIntercept) if rescaled else 0.0,
        center=center,
        width=width,
        function=str(dataset.get("VOILUTFunction", "LINEAR")).upper(),
        invert=invert,
    )


def _first(value: Any) -> float:
    """First item of a possibly multi-valued DICOM number."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _voi_to_unit(values: np.ndarray, dataset: Any) -> np.ndarray:
    """Apply the VOI transform (DICOM PS3.3 C.11.2) and return values in [0, 1]."""
    if "VOILUTSequence" in dataset and len(dataset.VOILUTSequence) > 0:
        from pydicom.pixels import apply_voi_lut

        item = dataset.VOILUTSequence[0]
        out = apply_voi_lut(values, dataset, index=0, prefer_lut=True).astype(np.float32)
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        return np.clip(out / float(2**bits - 1), 0.0, 1.0)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        if width > 0:
            function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
            return apply_window(values, center=center, width=width, function=function)
    return percentile_scale(values)


def apply_window(values: np.ndarray, *, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map values through a DICOM window to [0, 1] (formulas of PS3.3 C.11.2.1.2-3)."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0).astype(np.float32)
    if width < 1:
        width = 1.0
    denominator = max(width - 1.0, 1.0)
    return np.clip((values - (center - 0.5)) / denominator + 0.5, 0.0, 1.0).astype(np.float32)


def percentile_scale(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles and scale to [0, 1]; a flat image maps to zeros."""
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return minmax_scale(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def minmax_scale(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's own range; a flat image maps to zeros."""
    values = values.astype(np.float32, copy=False)
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageDecodeError("image contains non-finite values")
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return (values - lo) / (hi - lo)
