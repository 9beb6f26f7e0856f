"""Export stored latents with their metadata and labels for training downstream models.

Layout of ``OUT/`` (streamed chunk by chunk; memory stays bounded by one chunk):

* ``latents-00000.npz`` ... (format ``npz``): arrays ``image_ids`` int64, ``z`` float16
  ``(N, C, h, w)``, ``vectors`` float32 ``(N, D)`` of the configured space, and with ``include_s2``
  ``s2`` float16 ``(N, C, h, w)`` (the stage-2 latent, ``channel_proj(channel_ds(z) + z)``);
* a 3-D space's volumes differ in shape, so its ``z`` is ragged: one float16 array, each volume's z
  raveled in C order one after another, with ``z_shape`` int64 ``(N, 4)`` (each one's ``C, X, Y, Z``:
  ``np.split(z, np.cumsum(z_shape.prod(1))[:-1])`` gives them back) and ``spacing`` float32 ``(N, 3)``
  (mm per model-input voxel of each; NaN where unknown);
* ``latents.h5`` (format ``hdf5``, h5py): the same arrays as resizable datasets over all images,
  plus ``metadata_json`` (one JSON object per row, labels included) and the manifest as attributes;
* ``metadata.csv``: one row per image (image/study ids, shard, source, metadata, ``|``-joined labels);
* ``manifest.json``: model, space, counts, formats, files, array shapes and dtypes.

Vectors come from the database (the source of truth), not from the index.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import InvalidRequestError
from retrieval.service import SpaceService
from retrieval.storage.orm import ImageRecord

METADATA_COLUMNS = [
    "image_id", "study_id", "study_key", "shard", "source", "sha256", "modality", "body_part", "view",
    "laterality", "study_date", "width", "height", "labels",
]
FORMATS = ("npz", "hdf5")
ARRAY_DTYPES = {"image_ids": "int64", "vectors": "float32", "z_shape": "int64", "spacing": "float32"}


def _latent_arrays(service: SpaceService, chunk: list[tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """``z`` of a chunk: stacked for images; ragged (with ``z_shape`` and ``spacing``) for volumes."""
    if not service.is_volume_space:
        return {"z": np.stack([latent for _, latent in chunk]).astype(np.float16)}
    spacings = service.store.latent_spacings([image_id for image_id, _ in chunk], service.space.encoder_key)
    return {
        "z": np.concatenate([latent.astype(np.float16).ravel() for _, latent in chunk]),
        "z_shape": np.array([latent.shape for _, latent in chunk], dtype=np.int64),
        "spacing": np.array([spacings.get(image_id, (np.nan,) * 3) for image_id, _ in chunk], dtype=np.float32),
    }


def _metadata_row(image: ImageRecord, shard: str) -> dict[str, Any]:
    return {
        "image_id": image.id, "study_id": image.study_id, "study_key": image.study.study_key,
        "shard": shard, "source": image.source_uri, "sha256": image.sha256,
        "modality": image.modality or "", "body_part": image.body_part or "", "view": image.view or "",
        "laterality": image.laterality or "",
        "study_date": image.study_date.isoformat() if image.study_date else "",
        "width": image.width, "height": image.height, "labels": "|".join(image.labels or []),
    }


class _Hdf5Writer:
    """Appends chunks to resizable datasets of one HDF5 file."""

    def __init__(self, path: Path) -> None:
        import h5py

        self.h5py = h5py
        self.file = h5py.File(path, "w")

    def append(self, name: str, array: np.ndarray) -> None:
        if name not in self.file:
            self.file.create_dataset(name, data=array, maxshape=(None, *array.shape[1:]), chunks=True,
                                     compression="gzip" if array.dtype != object else None)
            return
        dataset = self.file[name]
        start = dataset.shape[0]
        dataset.resize(start + len(array), axis=0)
        dataset[start:] = array

    def append_strings(self, name: str, values: list[str]) -> None:
        dtype = self.h5py.string_dtype(encoding="utf-8")
        if name not in self.file:
            self.file.create_dataset(name, data=np.array(values, dtype=object), dtype=dtype, maxshape=(None,),
                                     chunks=True)
            return
        dataset = self.file[name]
        start = dataset.shape[0]
        dataset.resize(start + len(values), axis=0)
        dataset[start:] = values

    def close(self, attributes: dict[str, Any]) -> None:
        for key, value in attributes.items():
            self.file.attrs[key] = json.dumps(value)
        self.file.close()


def export_latents(
    service: SpaceService,
    out: Path,
    *,
    shard_size: int = 1000,
    formats: tuple[str, ...] = ("npz",),
    include_s2: bool = False,
) -> dict[str, Any]:
    """Write the export under ``out``; returns the manifest."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InvalidRequestError(f"export formats must be among {', '.join(FORMATS)}", detail={"field": "format"})
    out.mkdir(parents=True, exist_ok=True)
    space = service.space
    shards: list[str] = []
    shapes: dict[str, list[int]] = {}
    if include_s2 and service.is_volume_space:
        raise InvalidRequestError(
            "--include-s2: a 3-D space has no trained stage-2 latent (medvae never trains the 3-D head); "
            "its z is what medvae's 3-D encode returns, and is exported",
            detail={"field": "include_s2"},
        )
    total = 0
    hdf5 = _Hdf5Writer(out / "latents.h5") if "hdf5" in formats else None
    with (out / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        for number, chunk in enumerate(service.store.latents(space.encoder_key, chunk=shard_size)):
            ids = np.array([image_id for image_id, _ in chunk], dtype=np.int64)
            arrays: dict[str, np.ndarray] = {
                "image_ids": ids,
                **_latent_arrays(service, chunk),
                "vectors": service.store.vectors_of(space.id, ids.tolist()).astype(np.float32),
            }
            if include_s2:  # refused for 3-D spaces above: their stage-2 head is never trained
                z32 = torch.from_numpy(np.stack([latent for _, latent in chunk]))
                arrays["s2"] = service.encoder.s2_latent(z32).numpy().astype(np.float16)
            shard = f"latents-{number:05d}.npz" if "npz" in formats else "latents.h5"
            if "npz" in formats:
                np.savez(out / shard, **arrays)
                shards.append(shard)
            rows = service.store.images_by_id(ids.tolist())
            metadata = [_metadata_row(rows[image_id], shard) for image_id in ids.tolist()]
            writer.writerows(metadata)
            if hdf5 is not None:
                for name, array in arrays.items():
                    hdf5.append(name, array)
                hdf5.append_strings("metadata_json", [json.dumps(row) for row in metadata])
            shapes = {name: [-1, *array.shape[1:]] for name, array in arrays.items()}
            total += len(ids)
    manifest = {
        "model": service.model_info(),
        "space": service.space_info(),
        "images": total,
        "formats": list(formats),
        "shards": shards,
        "hdf5": "latents.h5" if hdf5 is not None else None,
        "arrays": {name: {"shape": shape, "dtype": ARRAY_DTYPES.get(name, "float16")} for name, shape in shapes.items()},
    }
    if service.is_volume_space:
        manifest["z_layout"] = "ragged: z holds each volume's z raveled in C order, one after another; z_shape gives their shapes"
    if hdf5 is not None:
        hdf5.close({"manifest": manifest})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
