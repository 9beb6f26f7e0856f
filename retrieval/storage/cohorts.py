"""The SQL half of a search's filters: the ids of a space's images that meet what SQL can check.

A selective cohort (one modality, a date range, given UIDs) is then searched among those ids only
(exactly when small, else through FAISS's ID selector; :meth:`SpaceIndex.search`), instead of
widening the ANN fetch until enough hits survive the filters. The filters' own ``accepts`` still checks every hit, so the SQL
half may be partial (labels, ages, quality bounds and exclusions stay post-filters) but never
wrong. A cohort larger than :data:`SELECTIVE_FRACTION` of the space is not worth it and gives None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from retrieval.domain.filters import Filters
from retrieval.storage.index import EXACT_COHORT_MAX, SpaceIndex
from retrieval.storage.orm import FILTER_COLUMNS, ImageRecord, Study, filter_expression
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


def cohort_image_ids(store: Store, index: SpaceIndex, filters: Filters) -> np.ndarray | None:
    """Sorted ids of the space's images that pass the SQL half, or None (nothing to check, or not selective).

    Selective means at most :data:`SELECTIVE_FRACTION` of the space and at most
    :data:`~retrieval.storage.index.EXACT_COHORT_MAX` images: the cohort is then searched exactly, and a
    broader one is better served by post-filtering the ANN's hits. A bounded count of the matching images
    (through the filter indexes) decides first, so a broad filter costs a scan of that many index
    entries and never a transfer of its ids; the space's own are then kept by the index's membership
    bitmap (:meth:`SpaceIndex.holds`) rather than by probing its vector rows in SQL.
    """
    conditions, needs_study = sql_conditions(filters)
    if not conditions:
        return None
    limit = min(int(index.count * SELECTIVE_FRACTION) + 1, EXACT_COHORT_MAX)
    matching = select(ImageRecord.id).where(*conditions)
    if needs_study:
        matching = matching.join(Study, Study.id == ImageRecord.study_id)
    with store.sessions() as session:
        if session.scalar(select(func.count()).select_from(matching.limit(limit + 1).subquery())) > limit:
            return None
        ids = _integers(session, matching)
    return np.sort(ids[index.holds(ids)])  # images of other spaces (a 3-D one, say) are not this space's


def _integers(session: Session, query: Select[Any]) -> np.ndarray:
    """The one integer column of ``query`` through the DB-API cursor: thousands of ids without building a
    SQLAlchemy row each (at 10,000 ids the rows cost several times the query, with GC pauses in the tail)."""
    connection = session.connection()
    compiled = query.compile(dialect=connection.dialect, compile_kwargs={"render_postcompile": True})
    params: Any = compiled.params
    if compiled.positiontup is not None:
        params = tuple(compiled.params[name] for name in compiled.positiontup)
    cursor = connection.connection.cursor()
    try:
        cursor.execute(str(compiled), params)
        return np.fromiter((row[0] for row in cursor.fetchall()), dtype=np.int64)
    finally:
        cursor.close()
