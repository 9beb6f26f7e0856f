"""Coverage-guided fuzzing (atheris) of the decode path: any exception but ``ImageDecodeError`` is a bug.

``retrieval.imaging.decode.decode_bytes`` is what every upload and every ingested file goes through
(Pillow for rasters, pydicom + its pixel handlers for DICOM, our windowing / LUT / resizing).
The harness feeds it mutated bytes, seeded from a small corpus of valid PNG / JPEG / TIFF /
DICOM files, under a pixel cap, and also pushes decoded pixels through ``fit_to_square``.
Bounded by ``-max_total_time``; not run in CI.

    pip install atheris
    python -m bench.fuzz_decode -max_total_time=300 -rss_limit_mb=4096
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from retrieval.errors import ImageDecodeError
    from retrieval.imaging.decode import decode_bytes
    from retrieval.imaging.preprocess import fit_to_square

MAX_PIXELS = 4_000_000


def seed_corpus(folder: Path) -> None:
    """A few valid files of each kind for the fuzzer to mutate."""
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    pixels = (np.linspace(0, 1, 32 * 32).reshape(32, 32) * 255).astype(np.uint8)
    for name, mode, fmt in [("a.png", "L", "PNG"), ("b.jpg", "L", "JPEG"), ("c.tif", "L", "TIFF"),
                            ("d.png", "RGBA", "PNG")]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
        (folder / name).write_bytes(buffer.getvalue())
    for name in ("CT_small.dcm", "MR_small.dcm", "rtdose_1frame.dcm"):
        try:
            (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
        except Exception:  # noqa: BLE001 - a seed pydicom does not ship is simply left out
            pass


def test_one_input(data: bytes) -> None:
    name = "fuzz.dcm" if len(data) > 132 and data[128:132] == b"DICM" else "fuzz.bin"
    try:
        decoded = decode_bytes(data, name=name, max_pixels=MAX_PIXELS)
    except ImageDecodeError:
        return  # the contract: refused with a reason
    square = fit_to_square(decoded.pixels, 64)
    assert square.shape == (64, 64) and square.dtype.name == "float32"
    assert float(square.min()) >= 0.0 and float(square.max()) <= 1.0


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-decode-"))
    seed_corpus(corpus)
    atheris.Setup([sys.argv[0], *sys.argv[1:], str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
