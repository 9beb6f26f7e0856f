"""Export stored latents with their metadata for downstream models.

Layout of ``OUT/``: ``latents-00000.npz`` ... (arrays ``image_ids`` int64, ``z`` float16
``(N, C, h, w)``, ``vectors`` float32 ``(N, D)`` of the configured space), one row per image in
``metadata.csv`` (image/study ids, shard, source, metadata, labels ``|``-joined) and
``manifest.json`` (space, encoder, counts). Streams shard by shard; memory stays bounded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.service import RetrievalService

METADATA_COLUMNS = [
    "image_id", "study_id", "study_key", "shard", "source", "sha256", "modality", "body_part", "view",
    "laterality", "study_date", "width", "height", "labels",
]


def export_latents(service: RetrievalService, out: Path, *, shard_size: int = 1000) -> dict[str, Any]:
    """Write shards + metadata + manifest under ``out``; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    space = service.space
    index = service.index
    shards: list[str] = []
    total = 0
    with (out / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        for number, chunk in enumerate(service.store.latents(space.encoder_key, chunk=shard_size)):
            ids = np.array([image_id for image_id, _ in chunk], dtype=np.int64)
            z = np.stack([latent for _, latent in chunk]).astype(np.float16)
            vectors = np.stack([index.index.reconstruct(int(i)) for i in ids]).astype(np.float32)
            name = f"latents-{number:05d}.npz"
            np.savez(out / name, image_ids=ids, z=z, vectors=vectors)
            shards.append(name)
            rows = service.store.images_by_id(ids.tolist())
            for image_id in ids.tolist():
                image = rows[image_id]
                writer.writerow({
                    "image_id": image.id, "study_id": image.study_id, "study_key": image.study.study_key,
                    "shard": name, "source": image.source_uri, "sha256": image.sha256,
                    "modality": image.modality or "", "body_part": image.body_part or "", "view": image.view or "",
                    "laterality": image.laterality or "",
                    "study_date": image.study_date.isoformat() if image.study_date else "",
                    "width": image.width, "height": image.height, "labels": "|".join(image.labels or []),
                })
            total += len(ids)
    manifest = {"model": service.model_info(), "space": service.space_info(), "images": total, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
