"""PNG image data inflated by libdeflate and unfiltered by Pillow gives Pillow's own pixels (retrieval/imaging/png_repack.py)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from retrieval.errors import ImageDecodeError
from retrieval.imaging.decode import decode_bytes
from retrieval.imaging.png_repack import PNG_SIGNATURE, repack_png

CAP = 80_000_000


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    position, found = len(PNG_SIGNATURE), []
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        found.append((data[position + 4:position + 8], data[position + 8:position + 8 + length]))
        position += 12 + length
    return found


def _with_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _row_filters(data: bytes, height: int) -> set[int]:
    """The PNG row filter types (0 None ... 4 Paeth) that a non-interlaced file uses."""
    rows = zlib.decompress(b"".join(body for kind, body in _chunks(data) if kind == b"IDAT"))
    stride = len(rows) // height
    return set(rows[::stride][:height])


def _pillow_png(array: np.ndarray | Image.Image, **options: object) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _radiograph(bits: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(bits)
    y, x = np.mgrid[0:size, 0:size] / size
    smooth = np.sin(6 * x) * np.cos(4 * y) + 0.05 * rng.standard_normal((size, size))
    unit = (smooth - smooth.min()) / np.ptp(smooth)
    return (unit * (4095 if bits == 16 else 255)).astype(np.uint16 if bits == 16 else np.uint8)


def _image_variants() -> dict[str, Callable[[], bytes]]:
    gray8, gray16 = _radiograph(8), _radiograph(16)
    rgb = np.stack([gray8, gray8[::-1], gray8.T], axis=-1)
    palette = Image.fromarray(gray8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "16-bit gray, Pillow": lambda: _pillow_png(gray16),
        "16-bit gray, libpng": lambda: imagecodecs.png_encode(gray16, level=6),
        "8-bit gray, libpng": lambda: imagecodecs.png_encode(gray8, level=6),
        "8-bit gray, odd width": lambda: _pillow_png(gray8[:, :77]),
        "RGB": lambda: _pillow_png(rgb),
        "16-bit RGB": lambda: imagecodecs.png_encode(rgb.astype(np.uint16) * 257, level=6),
        "RGBA": lambda: _pillow_png(np.dstack([rgb, gray8])),
        "gray + alpha": lambda: _pillow_png(Image.fromarray(gray8).convert("LA")),
        "palette with transparency": lambda: _pillow_png(palette, transparency=3),
        "1-bit": lambda: _pillow_png(Image.fromarray(gray8 > 128)),
        "uncompressed": lambda: _pillow_png(gray16, compress_level=0),
    }


@pytest.mark.parametrize("variant", list(_image_variants()))
def test_repacked_png_decodes_to_pillows_pixels_with_stored_image_data(variant: str) -> None:
    original = _image_variants()[variant]()
    repacked = repack_png(original, max_pixels=CAP)
    assert repacked is not None, f"{variant}: the re-pack should apply"
    with Image.open(io.BytesIO(original)) as expected, Image.open(io.BytesIO(repacked)) as actual:
        assert (actual.mode, actual.size, actual.info) == (expected.mode, expected.size, expected.info)
        assert np.array_equal(np.asarray(actual), np.asarray(expected))
    chunks = _chunks(repacked)
    assert [kind for kind, _ in chunks].count(b"IDAT") == 1
    idat = next(body for kind, body in chunks if kind == b"IDAT")
    assert idat[2] & 0b110 == 0, "the first deflate block should be stored (BTYPE 00), so Pillow's inflate only copies"
    others = [chunk for chunk in _chunks(original) if chunk[0] != b"IDAT"]
    assert [chunk for chunk in chunks if chunk[0] != b"IDAT"] == others, "every other chunk is kept as it was"


def test_rows_with_every_filter_type_are_unfiltered_like_pillow() -> None:
    gray8, gray16 = _radiograph(8, 256), _radiograph(16, 256)
    files = [imagecodecs.png_encode(gray8, level=6), imagecodecs.png_encode(gray16, level=6), _pillow_png(gray16)]
    assert set().union(*(_row_filters(data, 256) for data in files)) == {0, 1, 2, 3, 4}, "the files should use all five filters"
    for data in files:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(repack_png(data, max_pixels=CAP)))),
                              np.asarray(Image.open(io.BytesIO(data))))


def _interlaced(data: bytes) -> bytes:
    chunks = _chunks(data)
    header = chunks[0][1][:12] + b"\x01"
    return PNG_SIGNATURE + _with_chunk(b"IHDR", header) + b"".join(_with_chunk(k, b) for k, b in chunks[1:])


def _idat_split_by_text(data: bytes) -> bytes:
    chunks = _chunks(data)
    stream = b"".join(body for kind, body in chunks if kind == b"IDAT")
    middle = len(stream) // 2
    return (PNG_SIGNATURE + _with_chunk(b"IHDR", chunks[0][1]) + _with_chunk(b"IDAT", stream[:middle])
            + _with_chunk(b"tEXt", b"Comment\x00between") + _with_chunk(b"IDAT", stream[middle:]) + _with_chunk(b"IEND", b""))


def _corrupt_stream(data: bytes) -> bytes:
    chunks = _chunks(data)
    stream = bytearray(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stream[len(stream) // 2] ^= 0xFF
    return PNG_SIGNATURE + _with_chunk(b"IHDR", chunks[0][1]) + _with_chunk(b"IDAT", bytes(stream)) + _with_chunk(b"IEND", b"")


@pytest.mark.parametrize(("case", "alter", "max_pixels"), [
    ("not a PNG", lambda data: b"GIF89a" + data[6:], CAP),
    ("interlaced", _interlaced, CAP),
    ("image data split by another chunk", _idat_split_by_text, CAP),
    ("corrupt deflate stream", _corrupt_stream, CAP),
    ("truncated", lambda data: data[:-100], CAP),
    ("no IEND", lambda data: data[:-12], CAP),
    ("more pixels than the cap", lambda data: data, 96 * 96 - 1),
])
def test_repack_declines_what_it_does_not_apply_to(case: str, alter: Callable[[bytes], bytes], max_pixels: int) -> None:
    assert repack_png(alter(_pillow_png(_radiograph(16))), max_pixels=max_pixels) is None, case


def test_animated_png_is_left_to_pillow() -> None:
    frames = [Image.fromarray(_radiograph(8)), Image.fromarray(_radiograph(8)[::-1])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    assert repack_png(buffer.getvalue(), max_pixels=CAP) is None


def test_a_corrupt_png_upload_is_a_clear_error_naming_it() -> None:
    with pytest.raises(ImageDecodeError, match="scan.png: corrupt or truncated"):
        decode_bytes(_corrupt_stream(_pillow_png(_radiograph(16))), name="scan.png", max_pixels=CAP)


def test_decoded_png_pixels_are_unchanged_by_the_repack(monkeypatch: pytest.MonkeyPatch) -> None:
    data = imagecodecs.png_encode(_radiograph(16, 256), level=6)
    repacked: list[bool] = []
    monkeypatch.setattr("retrieval.imaging.decode.repack_png",
                        lambda data, max_pixels: repacked.append(True) or repack_png(data, max_pixels=max_pixels))
    fast = decode_bytes(data, name="chest.png", max_pixels=CAP)
    assert repacked == [True]
    monkeypatch.setattr("retrieval.imaging.decode.repack_png", lambda data, max_pixels: None)
    plain = decode_bytes(data, name="chest.png", max_pixels=CAP)
    assert np.array_equal(fast.pixels, plain.pixels)
