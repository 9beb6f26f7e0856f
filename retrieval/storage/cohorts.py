"""The SQL half of a search's filters: the ids of a space's images that meet what SQL can check.

A selective cohort (one modality, a date range, given UIDs) is then searched by FAISS among those
ids only (an ``IDSelectorBatch`` in the search parameters), instead of widening the ANN fetch until
enough hits survive the filters. The filters' own ``accepts`` still checks every hit, so the SQL
half may be partial (labels, ages, quality bounds and exclusions stay post-filters) but never
wrong. A cohort larger than :data:`SELECTIVE_FRACTION` of the space is not worth it and gives None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import func, select

from retrieval.domain.filters import Filters
from retrieval.storage.orm import ImageRecord, Study, Vector
from retrieval.storage.store import Store

SELECTIVE_FRACTION = 0.1
UPPER_CASE_KEYS = ("modality", "body_part", "view", "laterality", "patient_sex")


def sql_conditions(filters: Filters) -> list[Any]:
    """The conditions of ``filters`` that SQL can check exactly as :meth:`Filters.accepts` does."""
    conditions: list[Any] = []
    for key in UPPER_CASE_KEYS:
        wanted = getattr(filters, key)
        if wanted is not None:
            conditions.append(func.upper(func.coalesce(getattr(ImageRecord, key), "")).in_(sorted(wanted)))
    for key, column in (("series_uid", ImageRecord.series_uid), ("sop_uid", ImageRecord.sop_uid),
                        ("study_uid", Study.study_uid)):
        if getattr(filters, key) is not None:
            conditions.append(column.in_(sorted(getattr(filters, key))))
    date = func.coalesce(ImageRecord.study_date, Study.study_date)
    if filters.date_from is not None:
        conditions.append(date >= filters.date_from)
    if filters.date_to is not None:
        conditions.append(date <= filters.date_to)
    return conditions


def cohort_image_ids(store: Store, space_id: int, filters: Filters, space_size: int) -> np.ndarray | None:
    """Sorted ids of the space's images that pass the SQL half, or None (nothing to check, or not selective)."""
    conditions = sql_conditions(filters)
    if not conditions:
        return None
    limit = int(space_size * SELECTIVE_FRACTION) + 1
    with store.sessions() as session:
        ids = session.scalars(
            select(Vector.image_id)
            .join(ImageRecord, ImageRecord.id == Vector.image_id)
            .join(Study, Study.id == ImageRecord.study_id)
            .where(Vector.space_id == space_id, *conditions)
            .order_by(Vector.image_id)
            .limit(limit + 1)
        ).all()
    if len(ids) > limit:
        return None
    return np.asarray(ids, dtype=np.int64)
