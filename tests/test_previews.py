"""Previews are decoded at most once per space, in batches for a page, and kept on disk across restarts (issue 16.4)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_archive

from retrieval.config import Settings
from retrieval.errors import NotFoundError
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.query.previews import preview_png, previews_for
from retrieval.service import SpaceService


class CountingDecoder:
    """Wraps a service's ``encoder.decode``: records each batch size, optionally slowly."""

    def __init__(self, service: SpaceService, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.original = service.encoder.decode
        self.delay = delay
        service.encoder.decode = self  # type: ignore[method-assign]

    def __call__(self, z: Any) -> Any:
        self.batches.append(int(z.shape[0]))
        time.sleep(self.delay)
        return self.original(z)


@pytest.fixture
def archive_service(settings: Settings, tmp_path: Path) -> SpaceService:
    make_archive(tmp_path / "archive", studies=3, per_study=2)
    service = SpaceService(settings.replaced(batch_size=4))
    assert IngestPipeline(service).run(tmp_path / "archive").ingested == 6
    return service


def test_a_preview_is_decoded_once_and_survives_a_restart(archive_service: SpaceService) -> None:
    decoder = CountingDecoder(archive_service)
    first = preview_png(archive_service, 3)
    assert preview_png(archive_service, 3) == first and decoder.batches == [1]
    stored = archive_service.settings.storage.data_dir / "previews" / archive_service.space.key / "3.png"
    assert stored.read_bytes() == first
    restarted = SpaceService(archive_service.settings)
    after = CountingDecoder(restarted)
    assert preview_png(restarted, 3) == first and after.batches == []  # read from disk, not decoded again
    with pytest.raises(NotFoundError, match="image 999 does not exist"):
        preview_png(restarted, 999)


def test_a_page_is_decoded_in_batches_and_its_requests_wait_for_them(archive_service: SpaceService) -> None:
    decoder = CountingDecoder(archive_service, delay=0.3)
    store = previews_for(archive_service)
    warming = threading.Thread(target=store.warm, args=([1, 2, 3, 4, 5, 6],))
    warming.start()
    time.sleep(0.1)  # the batch has registered its images: the page's own requests arrive now
    pngs = [preview_png(archive_service, image_id) for image_id in (6, 1)]
    warming.join()
    assert decoder.batches == [4, 2]  # batch_size 4: two decoder calls for six previews, none for the requests
    assert all(png.startswith(b"\x89PNG") for png in pngs)
    assert store.warm([1, 2, 3, 4, 5, 6]) == 0 and decoder.batches == [4, 2]


def test_ingest_with_previews_fills_the_store(settings: Settings, tmp_path: Path) -> None:
    make_archive(tmp_path / "archive", studies=2, per_study=2)
    service = SpaceService(settings)
    report = IngestPipeline(service, previews=True).run(tmp_path / "archive")
    assert report.ingested == 4
    decoder = CountingDecoder(service)
    assert all(preview_png(service, image_id).startswith(b"\x89PNG") for image_id in range(1, 5))
    assert decoder.batches == []  # every preview was written at ingest
