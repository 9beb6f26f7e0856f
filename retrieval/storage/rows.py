"""Rows of the store: what one encoded image contributes to a batch write (checked, turned into an ORM row),
and the small helpers the store's queries share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from retrieval.domain.metadata import ImageMetadata
from retrieval.storage.orm import ImageRecord


@dataclass
class NewImage:
    """Everything one encoded image contributes to one batch write."""

    source_uri: str
    sha256: str
    study_key: str
    study_label: str
    kind: str
    width: int
    height: int
    frames: int
    metadata: ImageMetadata
    z: np.ndarray  # (C, h, w) float32; stored as float16
    vector: np.ndarray  # (D,) float32, L2-normalised
    quality: tuple[float, float] | None = None  # (PSNR dB, SSIM) of decode(z), when scored at ingest
    spacing: tuple[float, float, float] | None = None  # volumes: mm per model-input voxel (stored with z)
    head: np.ndarray | None = None  # images: the stage-2 latent (z's shape), stored for re-ranking


def check_arrays(new: NewImage, dim: int) -> None:
    """Refuse a vector or latent that would store garbage (wrong shape, NaN, infinity)."""
    vector = np.asarray(new.vector) if new.vector is not None else None
    if vector is None or vector.shape != (dim,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"{new.source_uri}: vector must be {dim} finite values, got {getattr(vector, 'shape', None)}")
    z = np.asarray(new.z) if new.z is not None else None
    if z is None or z.ndim not in (3, 4) or not np.all(np.isfinite(z)) or np.abs(z).max(initial=0.0) > 65000:
        raise ValueError(f"{new.source_uri}: latent must be a finite (C, h, w) or (C, d, h, w) array within float16 range")


def image_row(new: NewImage, study_id: int) -> ImageRecord:
    meta = new.metadata
    return ImageRecord(
        study_id=study_id,
        source_uri=new.source_uri,
        sha256=new.sha256,
        sop_uid=meta.sop_uid,
        series_uid=meta.series_uid,
        kind=new.kind,
        modality=meta.modality,
        body_part=meta.body_part,
        view=meta.view,
        laterality=meta.laterality,
        study_date=meta.study_date,
        patient_sex=meta.patient_sex,
        patient_age=meta.patient_age,
        patient_hash=meta.patient_hash,
        accession_hash=meta.accession_hash,
        width=new.width,
        height=new.height,
        frames=new.frames,
        labels=list(meta.labels),
        extra=dict(meta.extra),
        recon_psnr=new.quality[0] if new.quality else None,
        recon_ssim=new.quality[1] if new.quality else None,
    )


MANIFEST_FILLED = (
    "modality", "body_part", "view", "laterality", "study_date", "patient_sex", "patient_age", "patient_hash",
    "accession_hash",
)


def serialize_vector_writes(session: Session, space_id: int) -> None:
    """Make vector row ids of a space grow in commit order, so an index watermark never skips a row.

    PostgreSQL hands out sequence values at insert time: with two writers, row 102 may commit
    before row 101, and a reader that saw 102 would never look below it again. A transaction-level
    advisory lock per space orders the writers (a batch write holds it for milliseconds). SQLite
    already allows one writer at a time.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:namespace, :space_id)"),
                        {"namespace": _ADVISORY_NAMESPACE, "space_id": space_id})


_ADVISORY_NAMESPACE = 0x6D76  # "mv": keeps our advisory locks apart from other applications'


def decode_latent(shape: str, data: bytes) -> np.ndarray:
    dims = tuple(int(d) for d in shape.split(","))
    return np.frombuffer(data, dtype=np.float16).reshape(dims).astype(np.float32)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

