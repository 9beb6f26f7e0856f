"""Search results: typed hits, and the one JSON shape of images, studies and results.

The pydantic models here are the single serialisation of a result: the CLI's ``--json``, the
API's response models (``api/schemas.py`` builds on them) and the page's exports all use them,
so a field added here appears everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from retrieval.storage.orm import ImageRecord, Study


@dataclass
class ImageHit:
    image: ImageRecord
    score: float


@dataclass
class StudyHit:
    study: Study
    score: float
    images: list[ImageHit] = field(default_factory=list)


class StudySummary(BaseModel):
    study_id: int
    study_key: str
    label: str
    study_uid: str | None = Field(None, description="DICOM StudyInstanceUID, to find the study in the PACS.")
    study_date: str | None = None


class ImageResult(BaseModel):
    image_id: int
    source: str
    score: float | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    laterality: str | None = None
    study_date: str | None = None
    patient_sex: str | None = Field(None, description="DICOM PatientSex (M, F, O).")
    patient_age: str | None = Field(None, description="DICOM PatientAge as stored (e.g. 045Y).")
    series_uid: str | None = Field(None, description="DICOM SeriesInstanceUID.")
    sop_uid: str | None = Field(None, description="DICOM SOPInstanceUID.")
    width: int
    height: int
    labels: list[str] = []
    recon_psnr: float | None = Field(None, description="PSNR (dB) of the MedVAE reconstruction, when scored.")
    recon_ssim: float | None = Field(None, description="SSIM of the MedVAE reconstruction, when scored.")
    preview_url: str | None = None
    preview_png_base64: str | None = None


class StudyResult(BaseModel):
    study: StudySummary
    score: float
    images: list[ImageResult]


def study_summary(study: Study) -> StudySummary:
    return StudySummary(
        study_id=study.id,
        study_key=study.study_key,
        label=study.label,
        study_uid=study.study_uid,
        study_date=study.study_date.isoformat() if study.study_date else None,
    )


def image_result(image: ImageRecord, score: float | None = None) -> ImageResult:
    return ImageResult(
        image_id=image.id,
        source=image.source_uri,
        score=None if score is None else round(float(score), 6),
        modality=image.modality,
        body_part=image.body_part,
        view=image.view,
        laterality=image.laterality,
        study_date=image.study_date.isoformat() if image.study_date else None,
        patient_sex=image.patient_sex,
        patient_age=image.patient_age,
        series_uid=image.series_uid,
        sop_uid=image.sop_uid,
        width=image.width,
        height=image.height,
        labels=list(image.labels or []),
        recon_psnr=None if image.recon_psnr is None else round(float(image.recon_psnr), 2),
        recon_ssim=None if image.recon_ssim is None else round(float(image.recon_ssim), 4),
    )


def study_json(study: Study) -> dict[str, Any]:
    return study_summary(study).model_dump()


def image_json(image: ImageRecord, score: float | None = None) -> dict[str, Any]:
    """An image as every output shows it (preview fields are filled in by the API)."""
    return image_result(image, score).model_dump(exclude={"preview_url", "preview_png_base64"}, exclude_none=False)


def results_json(groups: list[StudyHit]) -> list[dict[str, Any]]:
    return [
        StudyResult(
            study=study_summary(group.study),
            score=round(float(group.score), 6),
            images=[image_result(hit.image, hit.score) for hit in group.images],
        ).model_dump(exclude={"images": {"__all__": {"preview_url", "preview_png_base64"}}})
        for group in groups
    ]
