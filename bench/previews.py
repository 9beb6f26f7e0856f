"""Preview cost: one-at-a-time PyTorch decodes (the old path) vs a page decoded in batches through the
preview store (OpenVINO decoder on the CPU when installed), then served from disk; and the decoder's
seconds per image beside the encoder's, in the same runtime and run.

Real MedVAE (seeded random weights: decoding costs the same as with trained ones) at the default
input size. Prints a table and writes JSON to ``bench/results/``.

    python -m bench.previews [--images 10] [--size 384]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.query.previews import pixels_to_png, previews_for
from retrieval.service import SpaceService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10, help="previews on the page (k)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray((rng.random((args.size, args.size)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        base = dict(weights="random", input_size=args.size, decode_workers=0, id_secret="bench")
        torch_service = SpaceService(Settings(data_dir=root / "data", runtime="torch", **base))
        IngestPipeline(torch_service).run(root)
        ids = list(range(1, args.images + 1))
        started = time.perf_counter()  # the old path: each preview decoded alone, every time it is asked for
        for image_id in ids:
            pixels_to_png(torch_service.encoder.decode(torch_service.stored_latent(image_id)[None])[0])
        rows["one_at_a_time_torch_s"] = time.perf_counter() - started
        torch_service.close()

        service = SpaceService(Settings(data_dir=root / "data", runtime="auto", **base))
        store = previews_for(service)
        started = time.perf_counter()
        store.warm(ids[:1])  # the first decode converts the decoder to OpenVINO once (cached on disk after)
        rows["first_preview_with_conversion_s"] = time.perf_counter() - started
        started = time.perf_counter()
        store.warm(ids[1:])
        rows["rest_of_page_batched_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for image_id in ids:
            store.png(image_id)
        rows["page_again_from_disk_s"] = time.perf_counter() - started
        # the decoder beside the encoder, same runtime, same run (issue 18, item 6)
        rows["decoder_s_per_image"] = rows["rest_of_page_batched_s"] / max(1, args.images - 1)
        pixels = rng.random((args.images, args.size, args.size)).astype(np.float32)
        service.encoder.encode(pixels[:1])  # converts the encoder to OpenVINO once
        started = time.perf_counter()
        service.encoder.encode(pixels)
        rows["encoder_s_per_image"] = (time.perf_counter() - started) / args.images
        rows["runtime"] = service.encoder.precision_label  # type: ignore[assignment]
        service.close()
    print(f"{args.images} previews at {args.size} px")
    for name, value in rows.items():
        print(f"  {name:34} {value:.3f}" if isinstance(value, float) else f"  {name:34} {value}")
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}",
              "images": args.images, "size": args.size, **rows}
    print(f"wrote {write_result(args.out, 'previews', result)}")


if __name__ == "__main__":
    main()
