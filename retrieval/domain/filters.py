"""Search filters: conditions on stored image metadata, parsed from ``key=value`` strings or the API's JSON.

Contract: unknown keys and malformed values raise :class:`~retrieval.errors.InvalidRequestError`
naming the filter (a typo is an error, never ignored); :meth:`Filters.accepts` decides one image.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from retrieval.domain.metadata import age_in_years, parse_date
from retrieval.errors import InvalidRequestError

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
    exclude_study_id: int | None = None  # the query's own study, when its patient is unknown
    exclude_image_ids: set[int] = field(default_factory=set)  # feedback examples, the query image itself
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

    def conditions(self) -> list[tuple[str, Filters]]:
        """Each condition that is set, alone, with a ``key=value`` name: to tell which one removed every result."""
        found: list[tuple[str, Filters]] = []
        for name in ("modality", "body_part", "view", "laterality", "patient_sex", "labels", *UID_KEYS):
            values = getattr(self, name)
            if values:
                found.append((f"{name}={','.join(sorted(values))}", Filters(**{name: values})))
        for name in ("date_from", "date_to", "age_from", "age_to", "min_score"):
            if getattr(self, name) is not None:
                found.append((f"{name}={getattr(self, name)}", Filters(**{name: getattr(self, name)})))
        found += [(f"{key}={bound}", Filters(quality={key: bound})) for key, bound in self.quality.items()]
        if self.exclude_patient_hash:
            found.append(("exclude_same_patient", Filters(exclude_patient_hash=self.exclude_patient_hash)))
        if self.exclude_study_id is not None:
            found.append(("exclude_same_patient (same study)", Filters(exclude_study_id=self.exclude_study_id)))
        return found

    def accepts(self, image: Any, score: float) -> bool:
        """True when a stored image (an ORM ``ImageRecord``) with this score meets every condition."""
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
        if self.exclude_study_id is not None and image.study_id == self.exclude_study_id:
            return False
        if image.id in self.exclude_image_ids:
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
