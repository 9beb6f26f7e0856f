"""Latency of ``rerank=latent``: re-scoring the ANN's top N with the stored latents.

An archive of generated images is ingested with the fake encoder (its latents have MedVAE's
shape: 4 x 48 x 48 at 384 px); the stage-2 head that re-ranking runs is then real MedVAE's
(``medvae_8_4_2d``, seeded random weights, on the CPU in the encoder's precision: bf16 where the CPU has
bf16 units, else fp32; ``--precision fp32`` forces fp32). Each query re-scores its top N:
one SQL fetch of N latents, the head over them, the cosines. Prints p50 / p95 in ms and writes
JSON to ``bench/results/``.

    python -m bench.rerank [--images 150] [--depth 100] [--queries 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.model.encoder import MedVAEEncoder
from retrieval.query.rerank import latent_rescorer
from retrieval.service import SpaceService


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CPUs with bf16 units) or fp32")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        settings = Settings(data_dir=root / "data", weights="fake", input_size=384, decode_workers=0, id_secret="bench")
        service = SpaceService(settings)
        IngestPipeline(service).run(root)
        medvae = MedVAEEncoder(settings.replaced(weights="random", precision=args.precision, runtime="torch"))
        service.encoder.s2_latent = medvae.s2_latent  # type: ignore[method-assign]  # MedVAE's own head
        index = service.searchable_index()
        timings = []
        for image_id in range(1, args.queries + 1):
            z = torch.from_numpy(service.stored_latent(image_id))
            hits = index.search(index.index.reconstruct(image_id), args.depth)[0]
            started = time.perf_counter()
            latent_rescorer(service, z, args.depth)(hits)
            timings.append((time.perf_counter() - started) * 1e3)
        service.close()
    p50, p95 = np.percentile(timings, [50, 95])
    print(f"rerank of the top {args.depth} (latents 4x48x48, MedVAE stage-2 head, {args.precision} CPU): "
          f"p50 {p50:.1f} ms, p95 {p95:.1f} ms over {args.queries} queries")
    result = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "depth": args.depth, "queries": args.queries, "precision": args.precision, "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2)}
    print(f"wrote {write_result(args.out, 'rerank', result)}")


if __name__ == "__main__":
    main()
