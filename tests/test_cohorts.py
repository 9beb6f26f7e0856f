"""Selective filters become a FAISS ID selector built from SQL: the same answer as post-filtering,
found among the cohort only (issue 15, cohorts filtered before the ANN)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from conftest import synthetic_image, write_png

import retrieval.query.search as search_module
from retrieval.config import Settings
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.query.search import run_search
from retrieval.service import SpaceService
from retrieval.storage.index import SpaceIndex


@pytest.fixture
def cohort_service(settings: Settings, tmp_path: Path) -> SpaceService:
    rows = ["path,study,modality,study_date"]
    for i in range(40):
        write_png(tmp_path / "files" / f"{i}.png", synthetic_image(300 + i))
        modality = "CR" if i % 20 == 0 else "DX"  # two CR images in forty
        rows.append(f"files/{i}.png,S{i},{modality},2024-01-{1 + i % 28:02d}")
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    service = SpaceService(settings)
    assert IngestPipeline(service).run(tmp_path / "cohort.csv").ingested == 40
    return service


def test_a_selective_cohort_is_searched_among_its_images_only(cohort_service: SpaceService, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[object] = []
    original = SpaceIndex.search

    def recording(self, queries, k, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("among"))
        return original(self, queries, k, **kwargs)

    monkeypatch.setattr(SpaceIndex, "search", recording)
    filtered = run_search(cohort_service, image_id=5, k=5, filter_pairs=["modality=cr"], group_by="image")
    assert seen and seen[0] is not None and sorted(seen[0].tolist()) == [1, 21]  # the two CR images, from SQL
    assert sorted(r["images"][0]["image_id"] for r in filtered["results"]) == [1, 21]
    monkeypatch.setattr(search_module, "cohort_image_ids", lambda *args: None)  # post-filtering only
    post = run_search(cohort_service, image_id=5, k=5, filter_pairs=["modality=cr"], group_by="image")
    assert [(r["images"][0]["image_id"], r["score"]) for r in post["results"]] == [
        (r["images"][0]["image_id"], r["score"]) for r in filtered["results"]]


def test_a_broad_filter_stays_a_post_filter(cohort_service: SpaceService, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[object] = []
    original = SpaceIndex.search
    monkeypatch.setattr(SpaceIndex, "search", lambda self, q, k, **kw: (seen.append(kw.get("among")), original(self, q, k, **kw))[1])
    broad = run_search(cohort_service, image_id=5, k=3, filter_pairs=["modality=DX"], group_by="image")
    assert seen[0] is None and len(broad["results"]) == 3  # 38 of 40 images: not worth a selector
    dated = run_search(cohort_service, image_id=5, k=40, filter_pairs=["date_from=2024-01-27", "date_to=2024-01-28"],
                       group_by="image")
    assert sorted(r["images"][0]["image_id"] for r in dated["results"]) == [27, 28]  # files 26 and 27


@pytest.mark.postgres
def test_cohort_ids_on_postgresql_match_sqlite(postgres_url: str, tmp_path: Path) -> None:
    """The cohort query runs on the DB-API cursor (expanded IN lists, both parameter styles): PostgreSQL too."""
    import numpy as np
    from conftest import tiny_settings

    from retrieval.domain.filters import Filters
    from retrieval.storage.cohorts import cohort_image_ids

    rows = ["path,study,modality,study_date"]
    for i in range(12):
        write_png(tmp_path / "files" / f"{i}.png", synthetic_image(700 + i))
        rows.append(f"files/{i}.png,S{i},{'cr' if i % 6 == 0 else 'DX'},2024-02-{1 + i:02d}")
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    found = {}
    for name, url in (("sqlite", None), ("postgres", postgres_url)):
        # a pooling of its own: the shared PostgreSQL database holds other tests' spaces
        service = SpaceService(tiny_settings(tmp_path / name, database_url=url, pooling="spp:1,3"))
        assert IngestPipeline(service).run(tmp_path / "cohort.csv").ingested == 12
        ids = {image.sha256: image.id for chunk in service.store.iter_images() for image in chunk}
        index = service.searchable_index()
        by_modality = cohort_image_ids(service.store, index, Filters(modality={"CR"}))
        by_date = cohort_image_ids(service.store, index, Filters(modality={"DX", "CR"}, date_to=dt.date(2024, 2, 1)))
        assert by_modality is not None and by_date is not None and by_modality.dtype == np.int64
        back = {image_id: sha for sha, image_id in ids.items()}
        found[name] = (sorted(back[i] for i in by_modality.tolist()), [back[i] for i in by_date.tolist()])
        service.close()
    assert found["sqlite"] == found["postgres"] and len(found["sqlite"][0]) == 2 and len(found["sqlite"][1]) == 1
