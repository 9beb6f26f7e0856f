"""Latency of ``rerank=latent``: re-scoring the ANN's top N with the stored latents.

An archive of generated images is ingested with the fake encoder (its latents have MedVAE's
shape: 4 x 48 x 48 at 384 px) and real MedVAE's stage-2 head (``medvae_8_4_2d``, seeded random
weights), whose output ingest stores beside z. Each query re-scores its top N: one SQL read of the
N stored stage-2 latents, the cosines. The same queries are then run as on rows stored before
2026-11-30 (no stored stage-2 latent: one SQL read of z, the head over them on the CPU in the
encoder's precision, bf16 where the CPU has bf16 units; ``--precision fp32`` forces fp32). Prints
p50 / p95 in ms for both and writes JSON to ``bench/results/``.

    python -m bench.rerank [--images 150] [--depth 100] [--queries 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import update

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.model.encoder import MedVAEEncoder
from retrieval.query.rerank import latent_rescorer
from retrieval.service import SpaceService
from retrieval.storage.orm import Latent


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
        medvae = MedVAEEncoder(settings.replaced(weights="random", precision=args.precision, runtime="torch"))
        service.encoder.s2_latent = medvae.s2_latent  # type: ignore[method-assign]  # MedVAE's own head
        IngestPipeline(service).run(root)
        index = service.searchable_index()
        gc.collect()
        gc.freeze()  # as the API does once its model and index are loaded (api/main.py)
        timings: dict[str, list[float]] = {"stored": [], "computed": []}
        for path, values in timings.items():
            if path == "computed":  # rows as ingested before stage-2 latents were stored
                with service.store.engine.begin() as connection:
                    connection.execute(update(Latent).values(head=None))
            latent_rescorer(service, torch.from_numpy(service.stored_latent(1)), args.depth)(
                index.search(index.index.reconstruct(1), args.depth)[0])  # warm-up: first SQL read and BLAS call
            for image_id in range(1, args.queries + 1):
                z = torch.from_numpy(service.stored_latent(image_id))
                hits = index.search(index.index.reconstruct(image_id), args.depth)[0]
                started = time.perf_counter()
                latent_rescorer(service, z, args.depth)(hits)
                values.append((time.perf_counter() - started) * 1e3)
        service.close()
    figures = {path: [round(float(v), 2) for v in np.percentile(values, [50, 95])] for path, values in timings.items()}
    for path, (p50, p95) in figures.items():
        print(f"rerank of the top {args.depth} (latents 4x48x48), {path} stage-2 latents: "
              f"p50 {p50:.1f} ms, p95 {p95:.1f} ms over {args.queries} queries")
    result = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "depth": args.depth, "queries": args.queries, "precision": args.precision,
              "p50_ms": figures["stored"][0], "p95_ms": figures["stored"][1],
              "computed_heads_p50_ms": figures["computed"][0], "computed_heads_p95_ms": figures["computed"][1]}
    print(f"wrote {write_result(args.out, 'rerank', result)}")


if __name__ == "__main__":
    main()
