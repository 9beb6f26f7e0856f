"""Compressed DICOM frames decoded on the encoder's GPU by nvImageCodec (decision 39).

A decode worker that would otherwise spend a core on a JPEG 2000 or JPEG Lossless frame hands it over still
compressed (:class:`~retrieval.imaging.decode.EncodedFrame`); the ingest pipeline decodes it here, on the device
where it is mapped and fitted (:mod:`retrieval.imaging.device_fit`), so that the stored values never cross the
PCIe bus and no CPU core decodes them.

Contract:

* :func:`open_device_codec` gives a :class:`DeviceFrameCodec` or None for the ``RETRIEVAL_INGEST_FRAME_DECODER``
  setting: ``cpu`` never; ``auto`` when the device is a CUDA GPU and ``nvidia.nvimgcodec`` imports and starts
  (anything else is logged and the workers decode as before); ``nvimgcodec`` always, or a
  :class:`~retrieval.errors.ConfigurationError` that says why not.
* :meth:`DeviceFrameCodec.decode_batch` returns each frame's stored values as an ``(rows, columns)`` int32 tensor on
  the codec's device, equal to what pydicom's ``pixel_array`` gives for the same frame (lossless syntaxes exactly),
  or a :class:`DeviceDecodeError` in its place; the pipeline then decodes that file on the CPU as before.
* Only unsigned grayscale frames of 8 or 16 bits are passed on (:func:`retrieval.imaging.decode._still_encoded`):
  signed frames, colour and everything without a rescale-and-window map are decoded by the workers.
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType
from typing import Any

import torch

from retrieval.errors import ConfigurationError
from retrieval.imaging.decode import EncodedFrame

logger = logging.getLogger(__name__)

SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1): 8-bit, lossy
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.201",  # HTJ2K Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.203",  # HTJ2K Image Compression
})
"""The transfer syntaxes nvImageCodec decodes on a GPU (its own pydicom plugin's list, 0.8 and later)."""

MODULE = "nvidia.nvimgcodec"


class DeviceDecodeError(Exception):
    """nvImageCodec could not decode a frame, or gave values of another shape or type than its header declares."""


class DeviceFrameCodec:
    """One nvImageCodec decoder on one device, keeping every frame's values as they are stored (any bit depth,
    no colour conversion). ``module`` is ``nvidia.nvimgcodec`` or an object with its ``Decoder``, ``CodeStream``,
    ``DecodeParams`` and ``ColorSpec`` (tests give one that decodes on the CPU)."""

    def __init__(self, module: ModuleType | Any, device: torch.device) -> None:
        self.device = device
        self.version = str(getattr(module, "__version__", "unknown"))
        index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
        self._decoder = module.Decoder(device_id=index)
        self._params = module.DecodeParams(allow_any_depth=True, color_spec=module.ColorSpec.UNCHANGED)
        self._code_stream = module.CodeStream  # a batch decode takes CodeStreams (made from bytes)
        self._lock = threading.Lock()

    def decode(self, frame: EncodedFrame) -> torch.Tensor:
        """One frame's stored values (:meth:`decode_batch`), or its :class:`DeviceDecodeError` raised."""
        result = self.decode_batch([frame])[0]
        if isinstance(result, DeviceDecodeError):
            raise result
        return result

    def decode_batch(self, frames: list[EncodedFrame]) -> list[torch.Tensor | DeviceDecodeError]:
        """Each frame's stored values, ``(rows, columns)`` int32 on :attr:`device`, decoded in one call (nvImageCodec
        spreads a batch over its threads and CUDA streams); in a frame's place a :class:`DeviceDecodeError` when
        nvImageCodec could not decode it or its output does not match the frame's header."""
        with self._lock:  # the API's request threads share one decoder
            try:
                images = self._decoder.decode([self._code_stream(frame.data) for frame in frames], params=self._params)
            except Exception as exc:  # noqa: BLE001 - the codec raises its own types; the caller falls back to the CPU
                return [DeviceDecodeError(f"nvImageCodec failed ({type(exc).__name__}: {exc})") for _ in frames]
            return [self._checked(image, frame) for image, frame in zip(images, frames, strict=True)]

    def _checked(self, image: Any, frame: EncodedFrame) -> torch.Tensor | DeviceDecodeError:
        if image is None:  # nvImageCodec's batch answer for a frame it could not decode
            return DeviceDecodeError("nvImageCodec could not decode the frame")
        try:
            values = torch.from_dlpack(image)  # the DLPack protocol orders nvImageCodec's stream before torch's
        except Exception as exc:  # noqa: BLE001 - a layout or type torch cannot take: the CPU decodes the frame
            return DeviceDecodeError(f"nvImageCodec's image cannot be taken by torch ({type(exc).__name__}: {exc})")
        if values.ndim == 3 and values.shape[-1] == 1:
            values = values[..., 0]
        expected = torch.uint8 if frame.bits_allocated == 8 else torch.uint16
        if tuple(values.shape) != (frame.rows, frame.columns) or values.dtype != expected:
            return DeviceDecodeError(f"nvImageCodec gave {values.dtype} {tuple(values.shape)}, the header declares "
                                     f"{frame.rows}x{frame.columns} of {frame.bits_allocated} bits")
        return values.to(self.device).to(torch.int32)  # torch's uint16 has copies and casts only: widen at once


def open_device_codec(choice: str, device: torch.device) -> DeviceFrameCodec | None:
    """The codec for a ``RETRIEVAL_INGEST_FRAME_DECODER`` choice (``auto``, ``cpu``, ``nvimgcodec``) on the encoder's
    ``device``, or None when compressed frames are decoded by the workers. See the module's contract."""
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return None
    try:
        module = importlib.import_module(MODULE)
        codec = DeviceFrameCodec(module, device)
    except Exception as exc:  # noqa: BLE001 - ImportError, or the library failing to start (no driver, no nvJPEG)
        reason = f"{type(exc).__name__}: {exc}"
        if choice == "nvimgcodec":
            raise ConfigurationError(
                f"RETRIEVAL_INGEST_FRAME_DECODER=nvimgcodec, but nvImageCodec cannot start on {device} ({reason}); "
                "install nvidia-nvimgcodec-cu13[nvjpeg,nvjpeg2k] (cu12 for a CUDA 12 PyTorch) on a machine with a "
                "GPU, or set it to auto or cpu", detail={"setting": "RETRIEVAL_INGEST_FRAME_DECODER"},
            ) from exc
        logger.info("compressed DICOM frames are decoded by the decode workers: nvImageCodec is not usable (%s)", reason)
        return None
    logger.info("compressed DICOM frames are decoded on %s by nvImageCodec %s", device, codec.version)
    return codec
