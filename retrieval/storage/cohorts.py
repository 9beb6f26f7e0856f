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
from retrieval.storage.index import EXACT_COHORT_MAX
from retrieval.storage.orm import (
    FILTER_COLUMNS,
    ImageRecord,
    Study,
    Vector,
    filter_expression,
)
from retrieval.storage.store import Store

SELECTIVE_FRACTION = 0.1


def sql_conditions(filters: Filters) -> tuple[list[Any], bool]:
    """The conditions of ``filters`` that SQL can check exactly as :meth:`Filters.accepts` does, and whether
    they need the studies table (study UIDs, dates)."""
    conditions: list[Any] = []
    for key in FILTER_COLUMNS:
        wanted = getattr(filters, key)
        if wanted is not None:
            conditions.append(filter_expression(key).in_(sorted(wanted)))
    needs_study = False
    if filters.series_uid is not None:
        conditions.append(ImageRecord.series_uid.in_(sorted(filters.series_uid)))
    if filters.sop_uid is not None:
        conditions.append(ImageRecord.sop_uid.in_(sorted(filters.sop_uid)))
    if filters.study_uid is not None:
        conditions.append(Study.study_uid.in_(sorted(filters.study_uid)))
        needs_study = True
    date = func.coalesce(ImageRecord.study_date, Study.study_date)
    if filters.date_from is not None:
        conditions.append(date >= filters.date_from)
        needs_study = True
    if filters.date_to is not None:
        conditions.append(date <= filters.date_to)
        needs_study = True
    return conditions, needs_study


def cohort_image_ids(store: Store, space_id: int, filters: Filters, space_size: int) -> np.ndarray | None:
    """Sorted ids of the space's images that pass the SQL half, or None (nothing to check, or not selective).

    Selective means at most :data:`SELECTIVE_FRACTION` of the space and at most
    :data:`~retrieval.storage.index.EXACT_COHORT_MAX` images: the cohort is then searched exactly, and a
    broader one is better served by post-filtering the ANN's hits. A bounded count decides first, so a
    broad filter costs a scan of that many index entries, never a transfer of its ids.
    """
    conditions, needs_study = sql_conditions(filters)
    if not conditions:
        return None
    limit = min(int(space_size * SELECTIVE_FRACTION) + 1, EXACT_COHORT_MAX)
    in_space = select(Vector.id).where(Vector.image_id == ImageRecord.id, Vector.space_id == space_id).exists()
    query = select(ImageRecord.id).where(*conditions, in_space)  # driven by the filter indexes, then a probe
    if needs_study:
        query = query.join(Study, Study.id == ImageRecord.study_id)
    with store.sessions() as session:
        if session.scalar(select(func.count()).select_from(query.limit(limit + 1).subquery())) > limit:
            return None
        ids = session.scalars(query).all()
    return np.sort(np.asarray(ids, dtype=np.int64))
