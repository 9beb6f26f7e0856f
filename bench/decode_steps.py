"""Where a decode worker's CPU goes for one 2048² 16-bit PNG, step by step (issue 18, item 1).

Generates ``--images`` synthetic chest radiographs (16-bit PNG, zlib level 6, as bench/ingest.py does),
then times, per image (mean over the images, best of ``--repeats`` passes): Pillow's decode alone,
imagecodecs' libpng decode, :func:`retrieval.imaging.decode.decode_path` (decode + float + min-max),
the same keeping the stored values (what a decode worker does when ingest fits on the encoder's device,
decision 36), and the fit to the model input (Pillow bicubic to 384); then ``decode_path`` with and without
the stored values on as many uncompressed 2048² DICOM (12-bit, windowed: bench/ingest.py's files); then the same
DICOM as JPEG 2000 lossless, decoded by a worker (pydicom: GDCM first) or passed on still compressed for the GPU's
nvImageCodec (decision 39: what a worker then costs).

PNG decodes are inflated by libdeflate and unfiltered by Pillow (retrieval/imaging/png_repack.py); the rows
ending ``_pillow_inflate_ms`` time the same step with Pillow's own zlib inflate, in the same run, and the
``libpng_written_`` rows repeat the comparison on the same images written by libpng (imagecodecs), whose
rows use all five PNG filters (Pillow's writer uses None, Sub, Up and Paeth).

    python -m bench.decode_steps --images 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
from PIL import Image

import retrieval.imaging.decode
from bench.ingest import _write_one
from bench.results_io import write_result
from retrieval.imaging.decode import decode_path
from retrieval.imaging.device_codec import SYNTAXES
from retrieval.imaging.png_repack import repack_png
from retrieval.imaging.preprocess import stretch_to_square
from retrieval.ops.sample import study_variant, synthetic_chest


def _per_image_ms(step: Callable[[str], Any], paths: list[str], repeats: int) -> float:
    step(paths[0])  # warm-up
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            step(path)
        passes.append((time.perf_counter() - start) / len(paths) * 1e3)
    return round(min(passes), 2)


@contextmanager
def _pillow_inflate() -> Iterator[None]:
    """Decode PNG files as before png_repack: Pillow inflates their image data with its own zlib."""
    real = retrieval.imaging.decode.repack_png
    retrieval.imaging.decode.repack_png = lambda data, max_pixels: None
    try:
        yield
    finally:
        retrieval.imaging.decode.repack_png = real


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _png_rows(paths: list[str], repeats: int, prefix: str = "") -> dict[str, float]:
    stored_values = lambda p: decode_path(p, max_pixels=10**9, keep_stored_values=True)  # noqa: E731
    rows = {
        f"{prefix}pillow_decode_ms": _per_image_ms(lambda p: np.asarray(Image.open(p)), paths, repeats),
        f"{prefix}repack_and_pillow_decode_ms": _per_image_ms(
            lambda p: np.asarray(Image.open(io.BytesIO(repack_png(Path(p).read_bytes(), max_pixels=10**9)))),
            paths, repeats),
        f"{prefix}decode_path_stored_values_ms": _per_image_ms(stored_values, paths, repeats),
    }
    with _pillow_inflate():
        rows[f"{prefix}decode_path_stored_values_pillow_inflate_ms"] = _per_image_ms(stored_values, paths, repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="decode-steps", help="result file: <out>/<name>-<date>.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(args.images):
            pixels = (synthetic_chest(rng, args.size, variant=study_variant(rng)) * 4095).astype(np.uint16)
            paths.append(str(Path(folder) / f"{i}.png"))
            Image.fromarray(pixels).save(paths[-1], compress_level=6)
        decoded = decode_path(paths[0], max_pixels=10**9)
        rows = {
            **_png_rows(paths, args.repeats),
            "imagecodecs_png_decode_ms": _per_image_ms(lambda p: imagecodecs.png_decode(Path(p).read_bytes()), paths,
                                                        args.repeats),
            "decode_path_ms": _per_image_ms(lambda p: decode_path(p, max_pixels=10**9), paths, args.repeats),
            "fit_to_384_ms": _per_image_ms(lambda _p: stretch_to_square(decoded.pixels, 384), paths, args.repeats),
        }
        libpng_paths = [path.replace(".png", "-libpng.png") for path in paths]
        for source, target in zip(paths, libpng_paths, strict=True):
            Path(target).write_bytes(imagecodecs.png_encode(np.asarray(Image.open(source)), level=6))
        rows.update(_png_rows(libpng_paths, args.repeats, prefix="libpng_written_"))
        dicoms = [str(Path(folder) / f"{i}.dcm") for i in range(args.images)]
        for i, path in enumerate(dicoms):
            _write_one(("dicom", path, i, args.size))
        rows["dicom_decode_path_ms"] = _per_image_ms(lambda p: decode_path(p, max_pixels=10**9), dicoms, args.repeats)
        rows["dicom_decode_path_stored_values_ms"] = _per_image_ms(
            lambda p: decode_path(p, max_pixels=10**9, keep_stored_values=True), dicoms, args.repeats)
        j2k = [path.replace(".dcm", "-j2k.dcm") for path in dicoms]
        for i, path in enumerate(j2k):
            _write_one(("dicom-j2k", path, i, args.size))
        rows["dicom_j2k_decode_path_stored_values_ms"] = _per_image_ms(
            lambda p: decode_path(p, max_pixels=10**9, keep_stored_values=True), j2k, args.repeats)
        rows["dicom_j2k_passed_on_ms"] = _per_image_ms(
            lambda p: decode_path(p, max_pixels=10**9, keep_stored_values=True, pass_encoded=SYNTAXES), j2k, args.repeats)
    for name, value in rows.items():
        print(f"{name:60} {value}")
    result = {"benchmark": "decode_steps", "date": dt.date.today().isoformat(),
              "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
              "images": args.images, "size": args.size, "format": "16-bit PNG, zlib level 6; DICOM explicit VR little endian, 12 bits stored; the same DICOM as "
                        "JPEG 2000 lossless (OpenJPEG)", **rows}
    print(f"wrote {write_result(args.out, args.name, result)}")


if __name__ == "__main__":
    main()
