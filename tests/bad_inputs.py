"""A generated corpus of awkward and broken inputs: what an archive really holds.

:func:`build_corpus` writes every case under a folder and returns ``{relative path: expected}``
where expected is ``"ok"`` (unusual but valid: must be ingested) or ``"fail"`` (must be refused
with a reason, never crash anything). Folder-level cases (symlink loop, a folder named like an
image, a non-UTF-8 file name) are written too; their files are listed like any other.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from conftest import synthetic_image
from dicom_factory import write_dicom
from PIL import Image
from pydicom.uid import generate_uid


def _png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _tiff(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


def _gray(seed: int, size: int = 48) -> np.ndarray:
    return synthetic_image(seed, size)


def _l8(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray((_gray(seed, size) * 255).astype(np.uint8))


def _png_with_header(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb's header."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _corrupt_middle(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    start = len(out) // 3
    out[start : start + 64] = rng.bytes(64)
    return bytes(out)


def _dicom_bytes(tmp: Path, name: str, pixels: np.ndarray, **kwargs: object) -> bytes:
    path = write_dicom(tmp / name, pixels, **kwargs)
    data = path.read_bytes()
    path.unlink()
    return data


def build_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under ``root``; returns ``{path relative to root: "ok" | "fail"}``."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = root.parent / f"{root.name}-scratch"
    scratch.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    u16 = (_gray(1) * 4000).astype(np.uint16)
    good_png = _png(_l8(2))
    good_jpg = _jpeg(_l8(3).convert("RGB"))
    good_dcm = _dicom_bytes(scratch, "g.dcm", u16)

    cases: dict[str, tuple[str, bytes | Callable[[Path], None]]] = {
        # --- unusual but valid: must be ingested
        "ok/palette.png": ("ok", _png(_l8(4).convert("P"))),
        "ok/rgba.png": ("ok", _png(_l8(5).convert("RGBA"))),
        "ok/la.png": ("ok", _png(_l8(6).convert("LA"))),
        "ok/bilevel.png": ("ok", _png(_l8(7).convert("1"))),
        "ok/gray16.png": ("ok", _png(Image.fromarray((_gray(8) * 65535).astype(np.uint16)))),
        "ok/optimized.png": ("ok", _png(_l8(9), optimize=True)),
        "ok/cmyk.jpg": ("ok", _jpeg(_l8(10).convert("CMYK"))),
        "ok/progressive.jpg": ("ok", _jpeg(_l8(11).convert("RGB"), progressive=True)),
        "ok/gray.jpg": ("ok", _jpeg(_l8(12))),
        "ok/float.tif": ("ok", _tiff(Image.fromarray(_gray(13).astype(np.float32), mode="F"))),
        "ok/gray16.tif": ("ok", _tiff(Image.fromarray((_gray(14) * 65535).astype(np.uint16)))),
        "ok/one_pixel.png": ("ok", _png(Image.new("L", (1, 1), 128))),
        "ok/one_by_10000.png": ("ok", _png(Image.fromarray((rng.random((1, 10000)) * 255).astype(np.uint8)))),
        "ok/10000_by_1.png": ("ok", _png(Image.fromarray((rng.random((10000, 1)) * 255).astype(np.uint8)))),
        "ok/constant.png": ("ok", _png(Image.new("L", (32, 32), 0))),
        "ok/monochrome1.dcm": ("ok", _dicom_bytes(scratch, "m1.dcm", u16, photometric="MONOCHROME1")),
        "ok/rescaled.dcm": ("ok", _dicom_bytes(scratch, "r.dcm", u16, slope=0.5, intercept=-100, window=(500, 1500))),
        "ok/multiframe.dcm": ("ok", _dicom_bytes(scratch, "mf.dcm", np.concatenate([u16, u16 // 2]), rows=48,
                                                 columns=48, NumberOfFrames=2)),
        "ok/no_suffix_dicom": ("ok", _dicom_bytes(scratch, "ns.dcm", (_gray(15) * 3000).astype(np.uint16))),
        "ok/upper.PNG": ("ok", _png(_l8(16))),
        # --- broken: must fail with a reason
        "bad/zero.png": ("fail", b""),
        "bad/zero.dcm": ("fail", b""),
        "bad/random.png": ("fail", rng.bytes(4096)),
        "bad/random.jpg": ("fail", rng.bytes(4096)),
        "bad/random.dcm": ("fail", rng.bytes(4096)),
        "bad/random.tif": ("fail", rng.bytes(4096)),
        "bad/text.png": ("fail", b"this is not an image\n" * 20),
        "bad/html.jpg": ("fail", b"<html><body>404 not found</body></html>"),
        "bad/gzip.dcm": ("fail", gzip.compress(good_dcm)),
        "bad/truncated.png": ("fail", good_png[:200]),
        "bad/truncated.jpg": ("fail", good_jpg[: len(good_jpg) // 3]),
        "bad/truncated.dcm": ("fail", good_dcm[:-2000]),
        "bad/header_only.dcm": ("fail", good_dcm[:400]),
        "bad/preamble_only.dcm": ("fail", b"\x00" * 128 + b"DICM"),
        "bad/corrupt_idat.png": ("fail", _corrupt_middle(_png(Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8))), 1)),
        "bad/soi_only.jpg": ("fail", b"\xff\xd8\xff"),
        "bad/bomb_20000.png": ("fail", _png_with_header(20000, 20000)),
        "bad/bomb_wide.png": ("fail", _png_with_header(1_000_000, 100)),
        "bad/huge_rows.dcm": ("fail", _dicom_bytes(scratch, "h.dcm", u16, rows=60000, columns=60000)),
        "bad/no_pixeldata.dcm": ("fail", _dicom_bytes(scratch, "np.dcm", u16, with_pixels=False)),
        "bad/wrong_length.dcm": ("fail", _dicom_bytes(scratch, "wl.dcm", u16, rows=96, columns=96)),
        "bad/zero_rows.dcm": ("fail", _dicom_bytes(scratch, "zr.dcm", u16, rows=0, columns=48)),
        "bad/unknown_compression.dcm": ("fail", _unknown_syntax_dicom(scratch, u16)),
        "bad/fake_jpeg2000.dcm": ("fail", _fake_compressed_dicom(scratch, u16, "1.2.840.10008.1.2.4.90")),
        "bad/fake_jpegls.dcm": ("fail", _fake_compressed_dicom(scratch, u16, "1.2.840.10008.1.2.4.80")),
    }
    expected: dict[str, str] = {}
    for relative, (outcome, content) in cases.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        assert isinstance(content, bytes)
        path.write_bytes(content)
        expected[relative] = outcome
    # a non-UTF-8 file name holding a good image
    odd = os.fsencode(str(root / "ok")) + b"/caf\xe9_latin1.png"
    with open(odd, "wb") as handle:
        handle.write(_png(_l8(17)))
    expected[os.fsdecode(odd)[len(str(root)) + 1 :]] = "ok"
    # a symlink loop and a folder named like an image: listed safely, nothing to ingest
    (root / "loop").mkdir()
    (root / "loop" / "again").symlink_to(root / "loop", target_is_directory=True)
    (root / "folder.png").mkdir()
    (root / "folder.png" / "inside.png").write_bytes(_png(_l8(18)))
    expected["folder.png/inside.png"] = "ok"
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()
    return expected


def _unknown_syntax_dicom(scratch: Path, pixels: np.ndarray) -> bytes:
    return _fake_compressed_dicom(scratch, pixels, "1.2.3.4.5.6.7.8.9.42")


def _fake_compressed_dicom(scratch: Path, pixels: np.ndarray, syntax: str) -> bytes:
    """An encapsulated-looking DICOM whose pixel data no decoder can read."""
    import pydicom
    from pydicom.encaps import encapsulate

    path = write_dicom(scratch / f"{generate_uid()}.dcm", pixels)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x11garbage-frame" * 10])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=False)
    data = path.read_bytes()
    path.unlink()
    return data


def manifest_cases(root: Path, expected: dict[str, str]) -> list[tuple[str, str]]:
    """CSV manifests with missing / extra columns and bad paths: ``(path, expectation)``.

    ``"refused"``: the whole manifest is rejected with a message naming the column;
    ``"rows"``: good rows ingest, bad rows fail with a reason.
    """
    first_ok = next(p for p, outcome in expected.items() if outcome == "ok" and p.endswith(".png"))
    (root / "manifests").mkdir(exist_ok=True)
    no_path = root / "manifests" / "no_path_column.csv"
    no_path.write_text("file,study\nx.png,s1\n")
    mixed = root / "manifests" / "mixed.csv"
    mixed.write_text(
        "path,study,labels,extra_column,another\n"
        f"../{first_ok},manifest-study,a|b,x,y\n"
        ",empty-path,,,\n"
        "../does/not/exist.png,missing,,,\n"
        "../bad/zero.png,broken,,,\n"
        "short-row-only-path.png\n"
    )
    return [(str(no_path), "refused"), (str(mixed), "rows")]
