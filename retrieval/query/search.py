"""Similar-case search: query vector -> FAISS -> rows -> filters -> study grouping.

Contract of :func:`search_vector`: fetches ``k * overfetch`` images, drops FAISS ``-1`` ids and
ids without a database row, applies the filters, groups images by study (a study's score is its
best image's score) and returns the top ``k`` studies (or images with ``group_by="image"``).
When filters leave fewer than ``k`` groups it widens the fetch, up to the whole index.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from retrieval.errors import InvalidRequestError, NotFoundError
from retrieval.domain.evaluation import neighbour_label_scores
from retrieval.domain.metadata import age_in_years, parse_date
from retrieval.storage.orm import ImageRecord, Study
from retrieval.service import RetrievalService

QUALITY_KEYS = ("min_psnr", "max_psnr", "min_ssim", "max_ssim")
FILTER_KEYS = ("modality", "body_part", "view", "laterality", "patient_sex", "label", "date_from", "date_to",
               "age_from", "age_to", "study_uid", "series_uid", "sop_uid")
UID_KEYS = ("study_uid", "series_uid", "sop_uid")


@dataclass
class Filters:
    """Conditions every returned image must meet (``None`` = no condition)."""

    modality: set[str] | None = None
    body_part: set[str] | None = None
    view: set[str] | None = None
    laterality: set[str] | None = None
    labels: set[str] | None = None  # all must be present
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    patient_sex: set[str] | None = None  # DICOM PatientSex: M, F, O
    age_from: float | None = None  # years, from DICOM PatientAge (images without an age never pass a bound)
    age_to: float | None = None
    #: DICOM UIDs (exact, any of): restrict a search to given studies, series or instances
    study_uid: set[str] | None = None
    series_uid: set[str] | None = None
    sop_uid: set[str] | None = None
    min_score: float | None = None
    exclude_patient_hash: str | None = None
    #: reconstruction quality bounds (images without a stored score never pass a bound)
    quality: dict[str, float] = field(default_factory=dict)  # min_psnr, max_psnr, min_ssim, max_ssim

    @classmethod
    def parse(cls, pairs: list[str]) -> Filters:
        """From ``key=value`` strings (CLI ``--filter``); comma-separated values mean "any of"."""
        filters = cls()
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key, value = key.strip().replace("-", "_"), value.strip()
            if not sep or not value:
                raise InvalidRequestError(f"filter {pair!r}: expected key=value", detail={"field": "filter"})
            filters.set(key, value)
        return filters

    def set(self, key: str, value: str) -> None:
        values = {v.strip() for v in value.split(",") if v.strip()}
        if key in ("modality", "body_part", "view", "laterality", "patient_sex"):
            setattr(self, key, {v.upper() for v in values})
        elif key in UID_KEYS:
            setattr(self, key, values)
        elif key in ("label", "labels"):
            self.labels = values
        elif key in ("date_from", "date_to"):
            date = parse_date(value)
            if date is None:
                raise InvalidRequestError(f"filter {key}: {value!r} is not a date (YYYY-MM-DD)", detail={"field": key})
            setattr(self, key, date)
        elif key in QUALITY_KEYS:
            self.quality[key] = _number(key, value, "a number")
        elif key in ("age_from", "age_to"):
            setattr(self, key, _number(key, value, "a number of years"))
        elif key == "min_score":
            self.min_score = _number(key, value, "a number")
        else:
            raise InvalidRequestError(
                f"unknown filter {key!r}; use one of {', '.join(FILTER_KEYS + QUALITY_KEYS)}, min_score", detail={"field": "filter"}
            )

    def accepts(self, image: ImageRecord, score: float) -> bool:
        if self.min_score is not None and score < self.min_score:
            return False
        for key in ("modality", "body_part", "view", "laterality", "patient_sex"):
            wanted = getattr(self, key)
            if wanted is not None and (getattr(image, key) or "").upper() not in wanted:
                return False
        if self.age_from is not None or self.age_to is not None:
            age = age_in_years(image.patient_age)
            if age is None or (self.age_from is not None and age < self.age_from):
                return False
            if self.age_to is not None and age > self.age_to:
                return False
        if self.labels and not self.labels.issubset(set(image.labels or [])):
            return False
        if self.study_uid is not None and image.study.study_uid not in self.study_uid:
            return False
        if self.series_uid is not None and image.series_uid not in self.series_uid:
            return False
        if self.sop_uid is not None and image.sop_uid not in self.sop_uid:
            return False
        date = image.study_date or image.study.study_date
        if self.date_from and (date is None or date < self.date_from):
            return False
        if self.date_to and (date is None or date > self.date_to):
            return False
        if self.exclude_patient_hash and image.patient_hash == self.exclude_patient_hash:
            return False
        for key, bound in self.quality.items():
            value = image.recon_psnr if key.endswith("psnr") else image.recon_ssim
            if value is None or (value < bound if key.startswith("min") else value > bound):
                return False
        return True


def _number(key: str, value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidRequestError(f"filter {key}: {value!r} is not {what}", detail={"field": key}) from None


@dataclass
class ImageHit:
    image: ImageRecord
    score: float


@dataclass
class StudyHit:
    study: Study
    score: float
    images: list[ImageHit] = field(default_factory=list)


def search_vector(
    service: RetrievalService,
    vector: np.ndarray,
    *,
    k: int = 10,
    filters: Filters | None = None,
    group_by: Literal["study", "image"] = "study",
) -> list[StudyHit]:
    """Top-``k`` studies (or single images) for a query vector of the service's space."""
    if k < 1:
        raise InvalidRequestError("k must be at least 1", detail={"field": "k"})
    filters = filters or Filters()
    index = service.searchable_index()
    total = index.count
    fetch = min(total, k * service.settings.overfetch)
    while True:
        tick = time.perf_counter()
        hits = index.search(vector, fetch)[0] if fetch else []
        service.observe("search_seconds", time.perf_counter() - tick)
        rows = service.store.images_by_id([image_id for image_id, _ in hits])
        groups = _group(hits, rows, filters, group_by)
        if len(groups) >= k or fetch >= total:
            return groups[:k]
        fetch = min(total, fetch * 4)


def _group(
    hits: list[tuple[int, float]], rows: dict[int, ImageRecord], filters: Filters, group_by: str
) -> list[StudyHit]:
    groups: dict[Any, StudyHit] = {}
    for image_id, score in hits:  # FAISS returns them best first
        image = rows.get(image_id)
        if image is None or not filters.accepts(image, score):
            continue
        key = image.study_id if group_by == "study" else image.id
        group = groups.get(key)
        if group is None:
            group = groups[key] = StudyHit(study=image.study, score=score)
        group.images.append(ImageHit(image=image, score=score))
    return sorted(groups.values(), key=lambda g: g.score, reverse=True)


def stored_vector(service: RetrievalService, image_id: int) -> np.ndarray:
    """The query vector of an image already in the archive (its stored vector in this space)."""
    index = service.searchable_index()
    try:
        return index.index.reconstruct(int(image_id)).astype(np.float32)
    except RuntimeError:
        raise NotFoundError(f"image {image_id} has no vector in this space", detail={"image_id": image_id}) from None


def study_json(study: Study) -> dict[str, Any]:
    return {
        "study_id": study.id,
        "study_key": study.study_key,
        "label": study.label,
        "study_uid": study.study_uid,
        "study_date": study.study_date.isoformat() if study.study_date else None,
    }


def image_json(image: ImageRecord, score: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image_id": image.id,
        "source": image.source_uri,
        "modality": image.modality,
        "body_part": image.body_part,
        "view": image.view,
        "laterality": image.laterality,
        "study_date": image.study_date.isoformat() if image.study_date else None,
        "patient_sex": image.patient_sex,
        "patient_age": image.patient_age,
        "series_uid": image.series_uid,
        "sop_uid": image.sop_uid,
        "width": image.width,
        "height": image.height,
        "labels": list(image.labels or []),
        "recon_psnr": None if image.recon_psnr is None else round(float(image.recon_psnr), 2),
        "recon_ssim": None if image.recon_ssim is None else round(float(image.recon_ssim), 4),
    }
    if score is not None:
        out["score"] = round(float(score), 6)
    return out


def results_json(groups: list[StudyHit]) -> list[dict[str, Any]]:
    return [
        {
            "study": study_json(group.study),
            "score": round(float(group.score), 6),
            "images": [image_json(hit.image, hit.score) for hit in group.images],
        }
        for group in groups
    ]


def run_search(
    service: RetrievalService,
    *,
    path: Any = None,
    image_id: int | None = None,
    data: bytes | None = None,
    data_name: str = "upload",
    vector: np.ndarray | None = None,
    query_patient_hash: str | None = None,
    k: int = 10,
    filter_pairs: list[str] | None = None,
    filters: Filters | None = None,
    group_by: Literal["study", "image"] | str = "study",
    exclude_same_patient: bool = False,
    sort: str = "score",
) -> dict[str, Any]:
    """Search by a file path, a stored image id, file bytes or a ready vector; returns the ``--json`` payload."""
    filters = filters or Filters.parse(filter_pairs or [])
    if image_id is not None:
        rows = service.store.images_by_id([image_id])
        if image_id not in rows:
            raise NotFoundError(f"image {image_id} does not exist", detail={"image_id": image_id})
        vector = stored_vector(service, image_id)
        query_patient_hash = rows[image_id].patient_hash
        query = {"image_id": image_id}
    elif path is not None:
        vector, query_patient_hash = _vector_and_patient_of_file(service, path)
        query = {"source": str(path)}
    elif data is not None:
        vector, query_patient_hash = _vector_and_patient_of_bytes(service, data, data_name)
        query = {"source": data_name}
    elif vector is not None:
        query = {"source": "vector"}
    else:
        raise InvalidRequestError("a query needs an image file, an image id or a vector", detail={"field": "image"})
    if exclude_same_patient:
        if not query_patient_hash:
            raise InvalidRequestError(
                "exclude_same_patient needs a query whose patient is known (a stored image or a DICOM with PatientID)",
                detail={"field": "exclude_same_patient"},
            )
        filters.exclude_patient_hash = query_patient_hash
    groups = search_vector(service, vector, k=k, filters=filters, group_by="image" if group_by == "image" else "study")
    groups = sort_groups(groups, sort)
    hits = [hit for group in groups for hit in group.images]
    return {
        "model": service.model_info(),
        "space": service.space_info(),
        "query": query,
        "group_by": group_by,
        "results": results_json(groups),
        # label frequencies among the returned images, weighted by score: kNN "CAD on latents"
        "neighbour_labels": neighbour_label_scores(
            [frozenset(hit.image.labels or []) for hit in hits], [hit.score for hit in hits]
        ),
        "warnings": empty_space_warnings(service),
    }


SORT_KEYS = ("score", "psnr", "ssim")


def sort_groups(groups: list[StudyHit], sort: str) -> list[StudyHit]:
    """Order the top-k: by score (default), or by the best image's reconstruction PSNR / SSIM,
    worst first, so that poorly represented (out-of-distribution) cases surface; unscored last."""
    if sort == "score":
        return groups
    if sort not in SORT_KEYS:
        raise InvalidRequestError(f"sort must be one of {', '.join(SORT_KEYS)}", detail={"field": "sort"})
    attribute = "recon_psnr" if sort == "psnr" else "recon_ssim"

    def key(group: StudyHit) -> tuple[bool, float]:
        value = getattr(group.images[0].image, attribute)
        return (value is None, value if value is not None else 0.0)

    return sorted(groups, key=key)


def empty_space_warnings(service: RetrievalService) -> list[str]:
    """When the searched space is empty, name the spaces that do hold vectors (settings differ).

    Called right after a search, which has already brought the index up to date with the database.
    """
    if service.index.count > 0:
        return []
    others = []
    for space in service.store.list_spaces():
        count, _ = service.store.vector_stats(space.id)
        if count and space.id != service.space.id:
            others.append(f"{space.key[:12]} (input_size={space.input_size}, pooling={space.pooling}, {count} images)")
    if not others:
        return ["the archive is empty: ingest a folder or manifest first"]
    return ["this space holds no images; the archive has vectors in other spaces: " + "; ".join(others)]


def _vector_and_patient_of_file(service: RetrievalService, path: Any) -> tuple[np.ndarray, str | None]:
    from retrieval.imaging.decode import decode_path

    if service.settings.model_dims == 3:
        return _vector_and_patient_of_volume(service, path)
    return _vector_and_patient(service, decode_path(path, max_pixels=service.settings.max_image_pixels))


def _vector_and_patient_of_bytes(service: RetrievalService, data: bytes, name: str) -> tuple[np.ndarray, str | None]:
    from retrieval.imaging.decode import decode_bytes

    if service.settings.model_dims == 3:  # an uploaded volume: NIfTI only (a series is many files)
        import tempfile

        from retrieval.imaging.volumes import is_nifti

        suffix = ".nii.gz" if name.lower().endswith(".gz") or data[:2] == b"\x1f\x8b" else ".nii"
        if name and not is_nifti(name) and not name.lower().endswith(".gz"):
            raise InvalidRequestError(
                f"{name}: a 3-D space takes a NIfTI volume (.nii / .nii.gz) as the query, or a series id",
                detail={"field": "file"},
            )
        with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
            handle.write(data)
            handle.flush()
            return _vector_and_patient_of_volume(service, handle.name)
    return _vector_and_patient(service, decode_bytes(data, name=name, max_pixels=service.settings.max_image_pixels))


def _vector_and_patient_of_volume(service: RetrievalService, path: Any) -> tuple[np.ndarray, str | None]:
    """A query volume: a NIfTI file, or a folder holding exactly one DICOM series."""
    from retrieval.ingest.volume_pipeline import volume_metadata, volume_model_input
    from retrieval.imaging.volumes import load_volume, scan_volumes

    items = [item for item in scan_volumes(path) if not item.error]
    if len(items) != 1:
        raise InvalidRequestError(
            f"{path}: a volume query is one NIfTI file or a folder with exactly one DICOM series (found {len(items)})",
            detail={"field": "image"},
        )
    volume = load_volume(items[0], max_voxels=service.settings.max_image_pixels)
    vector = service.embed_query(volume_model_input(volume, service.settings.volume_size))[1]
    patient = volume_metadata(volume, secret=service.settings.id_secret, date_shift_days=0).patient_hash
    return vector, patient


def _vector_and_patient(service: RetrievalService, decoded: Any) -> tuple[np.ndarray, str | None]:
    from retrieval.imaging.decode import fit_to_square
    from retrieval.domain.metadata import from_dicom

    pixels = fit_to_square(decoded.pixels, service.settings.input_size)
    vector = service.embed_query(pixels)[1]
    patient = from_dicom(decoded.dicom, secret=service.settings.id_secret).patient_hash if decoded.dicom is not None else None
    return vector, patient
