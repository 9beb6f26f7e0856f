from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import synthetic_image, write_png
from dicom_factory import write_dicom
from PIL import Image
from pydicom.data import get_testdata_file

from retrieval.errors import ImageDecodeError, ImageTooLargeError
from retrieval.imaging.decode import (
    DecodedImage,
    apply_window,
    decode_bytes,
    decode_path,
)
from retrieval.imaging.preprocess import fit_to_square, preprocess_spec, to_model_input

CAP = 80_000_000


def test_16bit_png_keeps_full_range_without_wrapping(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    decoded = decode_path(path, max_pixels=CAP)
    row = decoded.pixels[0]
    assert decoded.pixels.dtype == np.float32
    assert np.all(np.diff(row) >= 0), "a wrapped 16-bit image would not be monotonic"
    assert row[0] == 0.0 and row[-1] == 1.0
    assert np.allclose(row, ramp[0] / 65535.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_raster_modes_decode_to_unit_grayscale(tmp_path: Path, mode: str) -> None:
    base = (np.linspace(0, 255, 64 * 48).reshape(48, 64)).astype(np.uint8)
    image = Image.fromarray(base).convert(mode) if mode != "I;16" else Image.fromarray(base.astype(np.uint16) * 257)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    image.save(path)
    decoded = decode_path(path, max_pixels=CAP)
    assert decoded.pixels.shape == (48, 64)
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == 1.0
    assert np.corrcoef(decoded.pixels.ravel(), base.ravel())[0, 1] > 0.99


def test_jpeg_decodes(tmp_path: Path) -> None:
    base = (np.linspace(0, 255, 64 * 64).reshape(64, 64)).astype(np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(base).save(path, quality=95)
    assert decode_path(path, max_pixels=CAP).pixels.shape == (64, 64)


def test_dicom_rescale_then_window(tmp_path: Path) -> None:
    raw = np.array([[0, 100, 200, 300]], dtype=np.uint16).repeat(4, axis=0)
    # HU = 2 * raw - 100 -> -100, 100, 300, 500; window centre 200, width 401 -> [0, 1] over [0, 400]
    path = write_dicom(tmp_path / "w.dcm", raw, slope=2, intercept=-100, window=(200, 401))
    decoded = decode_path(path, max_pixels=CAP)
    expected = apply_window(raw[0].astype(np.float32) * 2 - 100, center=200, width=401)
    assert np.allclose(decoded.pixels[0], expected)
    assert decoded.pixels[0, 0] == 0.0 and decoded.pixels[0, -1] == 1.0
    assert 0.2 < decoded.pixels[0, 1] < 0.3


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = np.array([[0, 1000, 2000, 3000]], dtype=np.uint16).repeat(4, axis=0)
    mono2 = decode_path(write_dicom(tmp_path / "m2.dcm", raw, window=(1500, 3001)), max_pixels=CAP).pixels
    mono1 = decode_path(
        write_dicom(tmp_path / "m1.dcm", raw, window=(1500, 3001), photometric="MONOCHROME1"), max_pixels=CAP
    ).pixels
    assert np.allclose(mono1, 1.0 - mono2)


def test_real_monochrome1_cr_file_bright_bones() -> None:
    path = get_testdata_file("RG1_UNCR.dcm")  # CR chest PA, MONOCHROME1, window 15000/30000
    assert path is not None, "pydicom-data is a dev dependency"
    ds = pydicom.dcmread(path)
    decoded = decode_path(path, max_pixels=CAP)
    raw = ds.pixel_array.astype(np.float32)
    assert decoded.pixels.shape == raw.shape
    # MONOCHROME1: high stored values are dark, so the output must fall as the raw value rises
    assert np.corrcoef(decoded.pixels.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.99


def test_no_window_uses_percentile_clipping() -> None:
    path = get_testdata_file("CT_small.dcm")  # rescale -1024, no window
    decoded = decode_path(path, max_pixels=CAP)
    hu = pydicom.dcmread(path).pixel_array.astype(np.float32) - 1024
    lo, hi = np.percentile(hu, [0.5, 99.5])
    assert np.allclose(decoded.pixels, np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert decoded.dicom.Modality == "CT"


def test_multiframe_uses_first_frame() -> None:
    path = get_testdata_file("emri_small.dcm")  # 10 frames
    decoded = decode_path(path, max_pixels=CAP)
    first = pydicom.dcmread(path).pixel_array[0].astype(np.float32)
    lo, hi = np.percentile(first, [0.5, 99.5])
    assert decoded.frames == 10
    assert np.allclose(decoded.pixels, np.clip((first - lo) / (hi - lo), 0, 1), atol=1e-6)
    # issue 17: the cap counts what is decoded (one frame), not every frame: 120 x 480x640 RGB fits a 1 Mpx cap
    colour = decode_path(get_testdata_file("color3d_jpeg_baseline.dcm"), max_pixels=480 * 640 * 3)
    assert colour.frames == 120 and colour.pixels.shape == (480, 640)
    with pytest.raises(ImageTooLargeError, match="per frame"):
        decode_path(get_testdata_file("color3d_jpeg_baseline.dcm"), max_pixels=480 * 640 * 3 - 1)


@pytest.mark.parametrize(
    ("compressed", "uncompressed"), [("MR_small_RLE.dcm", "MR_small.dcm"), ("RG1_J2KR.dcm", "RG1_UNCR.dcm")]
)
def test_compressed_equals_uncompressed_twin(compressed: str, uncompressed: str) -> None:
    a = decode_path(get_testdata_file(compressed), max_pixels=CAP).pixels
    b = decode_path(get_testdata_file(uncompressed), max_pixels=CAP).pixels
    assert np.array_equal(a, b)


def test_color_dicom_reduced_to_luminance() -> None:
    decoded = decode_path(get_testdata_file("SC_rgb_rle_2frame.dcm"), max_pixels=CAP)
    assert decoded.pixels.ndim == 2 and decoded.frames == 2


def _png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose IHDR is rewritten to declare width x height (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_png_bomb_refused_before_decoding(tmp_path: Path) -> None:
    path = _png_with_declared_size(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        decode_path(path, max_pixels=CAP)


def test_dicom_pixel_cap_checked_from_header(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((2, 2)), rows=60000, columns=60000, with_pixels=False)
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        decode_path(path, max_pixels=CAP)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty"),
        ("noise.png", bytes(range(256)) * 8, "not a recognised image"),
        ("noise.dcm", bytes(range(256)) * 8, "DICOM"),
    ],
)
def test_bad_files_raise_with_file_name(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_path(path, max_pixels=CAP)
    assert name in str(info.value)


def test_truncated_png_and_dicom_fail(tmp_path: Path) -> None:
    png = tmp_path / "t.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:-200])
    with pytest.raises(ImageDecodeError):
        decode_path(png, max_pixels=CAP)
    dcm = write_dicom(tmp_path / "t.dcm", np.ones((64, 64)))
    dcm.write_bytes(dcm.read_bytes()[:-3000])
    with pytest.raises(ImageDecodeError):
        decode_path(dcm, max_pixels=CAP)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4)), with_pixels=False)
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        decode_path(path, max_pixels=CAP)


def test_decode_bytes_matches_decode_path(tmp_path: Path) -> None:
    path = get_testdata_file("MR_small.dcm")
    assert np.array_equal(decode_bytes(Path(path).read_bytes(), max_pixels=CAP).pixels, decode_path(path, max_pixels=CAP).pixels)


def test_fit_to_square_preserves_aspect_and_pads() -> None:
    pixels = np.tile(np.linspace(0.5, 1.0, 200, dtype=np.float32), (100, 1))
    fitted = fit_to_square(pixels, 64)
    assert fitted.shape == (64, 64)
    rows = np.where(fitted.max(axis=1) > 0.5)[0]
    assert len(rows) == 32 and rows[0] == 16  # 200x100 -> 64x32, centred
    assert fitted[:16].max() == 0.0 and fitted[48:].max() == 0.0
    assert fitted[16:48].max() == 1.0 and fitted[16:48].min() == 0.0  # ScaleIntensity(0, 1) over the image


def test_stretch_is_medvaes_training_input() -> None:
    """Issue 13.1-2: the default fit stretches to the square (no padding, aspect not kept) and min-max
    scales afterwards, so a DICOM window whose values stay within [0.2, 0.6] spans [0, 1]."""
    pixels = np.zeros((100, 200), np.float32) + 0.2
    pixels[:, 100:] = 0.6  # left half dark, right half bright
    stretched = to_model_input(DecodedImage(pixels=pixels, kind="dicom", width=200, height=100),
                               preprocess_spec(2, 64))
    assert stretched.shape == (64, 64) and stretched.min() == 0.0 and stretched.max() == 1.0
    assert (stretched[:, :28] < 0.05).all() and (stretched[:, 36:] > 0.95).all()  # every row, top to bottom
    assert preprocess_spec(2, 64).version == "v2" and preprocess_spec(2, 64, "letterbox").version == "v2-letterbox"
    letterboxed = to_model_input(DecodedImage(pixels=pixels, kind="dicom", width=200, height=100),
                                 preprocess_spec(2, 64, "letterbox"))
    assert letterboxed[:16].max() == 0.0 and not np.array_equal(letterboxed, stretched)


def test_large_decodes_pass_the_gate_one_at_a_time(tmp_path: Path) -> None:
    """Issue 17: a large declared image waits for the gate; small images never do."""
    import threading

    from retrieval.imaging.decode_gate import LARGE_DECODE_VALUES, decoding

    big = tmp_path / "big.png"
    Image.new("L", (4000, 4000), 7).save(big)  # 16 Mpx in a few KB
    small = write_png(tmp_path / "small.png", synthetic_image(5))
    results: list[object] = []
    with decoding(LARGE_DECODE_VALUES):  # another large decode is running
        waiting = threading.Thread(target=lambda: results.append(decode_path(big, max_pixels=20_000_000)))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive() and not results  # the large one waits
        assert decode_path(small, max_pixels=CAP).pixels.shape == (96, 96)  # a small one passes at once
    waiting.join(60)
    assert len(results) == 1 and results[0].pixels.shape == (4000, 4000)


@pytest.mark.parametrize("shape", [(2048, 2048), (2500, 2048), (512, 640), (200, 400), (300, 300), (384, 384)])
def test_the_device_fit_equals_the_pillow_fit(shape: tuple[int, int]) -> None:
    """Issue 18: resizing and scaling in torch (on the encoder's device; here CPU tensors) gives the CPU path's input."""
    import torch

    from retrieval.imaging.device_fit import stretch_to_square as on_device
    from retrieval.imaging.preprocess import stretch_to_square
    from retrieval.ops.sample import study_variant, synthetic_chest

    rng = np.random.default_rng(shape[0] + shape[1])
    pixels = synthetic_chest(rng, max(shape), variant=study_variant(rng))[: shape[0], : shape[1]].copy()
    fitted = on_device(pixels, 384, torch.device("cpu"))
    assert fitted.dtype == torch.float32 and tuple(fitted.shape) == (384, 384)
    assert float(np.abs(fitted.numpy() - stretch_to_square(pixels, 384)).max()) < 2e-6
    flat = on_device(np.full(shape, 0.3, np.float32), 384, torch.device("cpu"))
    assert float(flat.abs().max()) == 0.0 and not stretch_to_square(np.full(shape, 0.3, np.float32), 384).any()


def _stored_value_cases(folder: Path) -> list[tuple[Path, str]]:
    """Files of every kind of UnitMap, and of kinds that stay mapped on the CPU, with the kind expected."""
    from retrieval.ops.sample import study_variant, synthetic_chest

    rng = np.random.default_rng(7)
    chest = synthetic_chest(rng, 1024, variant=study_variant(rng))[:1000, :900]
    raw = (chest * 3000 + 200).astype(np.uint16)
    Image.fromarray(raw).save(folder / "chest16.png")
    Image.fromarray((chest * 255).astype(np.uint8)).save(folder / "chest8.png")
    Image.fromarray((chest * 255).astype(np.uint8)).convert("RGB").save(folder / "chest_rgb.png")
    Image.fromarray((chest * 65535).astype(np.uint16)).save(folder / "full16.png")  # values above 32767 too
    return [
        (folder / "chest16.png", "minmax"),
        (folder / "full16.png", "minmax"),
        (folder / "chest8.png", "minmax"),
        (folder / "chest_rgb.png", "unit"),
        (write_dicom(folder / "linear.dcm", raw, slope=2, intercept=-1024, window=(1800, 3000)), "window"),
        (write_dicom(folder / "exact.dcm", raw, window=(1500, 2000), VOILUTFunction="LINEAR_EXACT"), "window"),
        (write_dicom(folder / "sigmoid.dcm", raw, window=(1500, 2000), VOILUTFunction="SIGMOID"), "window"),
        (write_dicom(folder / "mono1.dcm", raw, window=(1500, 3001), photometric="MONOCHROME1"), "window"),
        (write_dicom(folder / "flat.dcm", np.full((64, 80), 900, np.uint16), window=(1500, 3001)), "window"),
        (Path(get_testdata_file("RG1_UNCR.dcm")), "window"),  # a real CR: MONOCHROME1, window 15000 / 30000
        (Path(get_testdata_file("CT_small.dcm")), "unit"),  # no window: percentile clipping stays on the CPU
    ]


def test_stored_values_fitted_on_the_device_equal_the_cpu_path(tmp_path: Path) -> None:
    """Issue 18: a decode worker hands over stored integers and their map to [0, 1]; mapped and fitted in torch
    (on the encoder's device; here CPU tensors) they give the CPU path's model input within 1e-5."""
    import torch

    from retrieval.imaging.device_fit import fit_frame

    spec = preprocess_spec(2, 384)
    for path, kind in _stored_value_cases(tmp_path):
        stored = decode_path(path, max_pixels=CAP, keep_stored_values=True)
        expected = to_model_input(decode_path(path, max_pixels=CAP), spec)
        assert stored.unit.kind == kind, path.name
        if kind == "unit":  # mapped on the CPU as always; the worker fits it too
            assert np.array_equal(to_model_input(stored, spec), expected), path.name
            continue
        assert stored.pixels.dtype.kind in "ui" and stored.pixels.dtype.isnative, path.name
        with pytest.raises(TypeError, match="stored values"):
            to_model_input(stored, spec)
        fitted = fit_frame(stored.pixels, stored.unit, 384, torch.device("cpu"))
        assert fitted.dtype == torch.float32 and tuple(fitted.shape) == (384, 384)
        assert float(np.abs(fitted.numpy() - expected).max()) < 1e-5, path.name
