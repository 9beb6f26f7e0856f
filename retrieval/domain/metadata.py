"""Clinical metadata of an image: what is stored, what is hashed, what is never kept.

Privacy rule (design decision 8): PatientID and AccessionNumber are stored only as
HMAC-SHA256 under the configured secret; PatientName, birth date, addresses and other direct
identifiers are never read into a stored field at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageMetadata:
    """Fields stored with an image row. Identifier fields hold keyed hashes, never raw values."""

    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    laterality: str | None = None
    study_date: dt.date | None = None
    patient_sex: str | None = None
    patient_age: str | None = None
    patient_hash: str | None = None
    accession_hash: str | None = None
    labels: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


def keyed_hash(value: str | None, secret: str) -> str | None:
    """HMAC-SHA256 of a stripped identifier, hex; ``None`` for empty values."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def parse_date(value: Any) -> dt.date | None:
    """DICOM DA (``YYYYMMDD``) or ISO ``YYYY-MM-DD``; ``None`` when empty or malformed."""
    if value is None:
        return None
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


AGE_UNIT_YEARS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def age_in_years(value: str | None) -> float | None:
    """DICOM AS (``045Y``, ``006M``, ``003W``, ``010D``) or a plain number of years; ``None`` if unreadable."""
    if not value:
        return None
    text = value.strip().upper()
    unit = AGE_UNIT_YEARS.get(text[-1:], None)
    number = text[:-1] if unit is not None else text
    try:
        return float(number) * (unit if unit is not None else 1.0)
    except ValueError:
        return None


def shifted_date(date: dt.date | None, patient_id: str | None, *, secret: str, max_days: int) -> dt.date | None:
    """``date`` moved by a per-patient offset in ``[-max_days, max_days]`` keyed by ``secret``.

    The same patient always gets the same offset, so intervals between a patient's studies are kept
    while calendar dates no longer identify the visit. ``max_days=0`` or no PatientID: unchanged.
    """
    if date is None or max_days <= 0 or not (patient_id or "").strip():
        return date
    digest = keyed_hash(f"date-shift:{patient_id.strip()}", secret)
    offset = int(digest[:8], 16) % (2 * max_days + 1) - max_days
    return date + dt.timedelta(days=offset)


def _text(dataset: Any, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def from_dicom(dataset: Any, *, secret: str, date_shift_days: int = 0) -> ImageMetadata:
    """Read the stored fields from a DICOM header; identifiers are hashed here and only here.

    ``date_shift_days > 0`` moves StudyDate by the patient's keyed offset (:func:`shifted_date`).
    """
    laterality = _text(dataset, "ImageLaterality") or _text(dataset, "Laterality")
    modality = _text(dataset, "Modality")
    return ImageMetadata(
        study_uid=_text(dataset, "StudyInstanceUID"),
        series_uid=_text(dataset, "SeriesInstanceUID"),
        sop_uid=_text(dataset, "SOPInstanceUID"),
        modality=modality.upper() if modality else None,
        body_part=(_text(dataset, "BodyPartExamined") or "").upper() or None,
        view=(_text(dataset, "ViewPosition") or "").upper() or None,
        laterality=laterality.upper() if laterality else None,
        study_date=shifted_date(
            parse_date(dataset.get("StudyDate")), _text(dataset, "PatientID"), secret=secret, max_days=date_shift_days
        ),
        patient_sex=_text(dataset, "PatientSex"),
        patient_age=_text(dataset, "PatientAge"),
        patient_hash=keyed_hash(_text(dataset, "PatientID"), secret),
        accession_hash=keyed_hash(_text(dataset, "AccessionNumber"), secret),
    )


MANIFEST_FIELDS = frozenset({
    "path", "study", "labels", "patient_id", "accession_number", "study_date", "modality", "body_part", "view",
    "laterality", "patient_sex", "patient_age",
})
"""Manifest columns the service knows; any other column is stored only when the user names it."""


def dropped_manifest_columns(columns: set[str], keep: frozenset[str]) -> list[str]:
    """The columns :func:`merge_manifest_row` will not store (names only: their values are never shown)."""
    return sorted(column for column in columns if column and column not in MANIFEST_FIELDS and column not in keep)


def merge_manifest_row(
    metadata: ImageMetadata, row: dict[str, str], *, secret: str, keep: frozenset[str] = frozenset()
) -> ImageMetadata:
    """Overlay a manifest row's columns: known fields fill gaps, ``labels`` split on ``|`` or ``;``.

    ``patient_id`` / ``accession_number`` columns are hashed. Other columns are stored in ``extra``
    (strings) only when named in ``keep`` (``RETRIEVAL_MANIFEST_COLUMNS``): a column the service does
    not know may carry an identifier (``PatientName``, ``mrn``, ``dob``), so none is kept by default.
    Header values from DICOM win over manifest values for UIDs.
    """
    for column, raw in row.items():
        if column in ("path", "study") or raw is None:
            continue
        value = str(raw).strip()
        if not value:
            continue
        if column == "labels":
            metadata.labels = sorted({part.strip() for part in value.replace(";", "|").split("|") if part.strip()})
        elif column == "patient_id":
            metadata.patient_hash = metadata.patient_hash or keyed_hash(value, secret)
        elif column == "accession_number":
            metadata.accession_hash = metadata.accession_hash or keyed_hash(value, secret)
        elif column == "study_date":
            metadata.study_date = metadata.study_date or parse_date(value)
        elif column in ("modality", "body_part", "view", "laterality"):
            if getattr(metadata, column) is None:
                setattr(metadata, column, value.upper())
        elif column in ("patient_sex", "patient_age"):
            if getattr(metadata, column) is None:
                setattr(metadata, column, value)
        elif column in keep:
            metadata.extra[column] = value
    return metadata
