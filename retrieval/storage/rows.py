"""What one encoded image contributes to a batch write, checked and turned into an ORM row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
