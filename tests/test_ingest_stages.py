"""The ingest pipeline's stages (retrieval/ingest/stages.py): order, back-pressure, failures, abandoning; and the
pipeline overlapping its encoder with its database writes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import synthetic_image, write_png

from retrieval.config import Settings
from retrieval.ingest import pipeline
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.ingest.stages import Stage, abandon
from retrieval.service import SpaceService


def test_a_stage_runs_its_items_in_order_and_holds_back_its_feeder_when_full() -> None:
    done: list[int] = []
    release = threading.Event()

    def work(item: int) -> None:
        release.wait(10)
        done.append(item)

    stage: Stage[int] = Stage("t", work, depth=2)
    stage.put(0)  # taken by the thread, which waits on `release`
    fed = threading.Event()

    def feed() -> None:
        for item in (1, 2, 3):  # 1 and 2 fill the inbox; 3 must wait
            stage.put(item)
        fed.set()

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert not fed.wait(0.5), "a full inbox holds its feeder back"
    release.set()
    assert fed.wait(10)
    feeder.join()
    stage.close()
    assert done == [0, 1, 2, 3]
    stage.close()  # twice: harmless


def test_a_failing_stage_raises_to_its_feeder_and_drops_what_follows() -> None:
    done: list[int] = []

    def work(item: int) -> None:
        if item == 1:
            raise ValueError("bad item")
        done.append(item)

    stage: Stage[int] = Stage("t", work, depth=1)
    stage.put(0)
    stage.put(1)
    with pytest.raises(ValueError, match="bad item") as failed:  # the error itself, its type kept
        for item in range(2, 50):
            stage.put(item)  # raises once the failure is seen; never blocks on the dead stage
    assert failed.value.__notes__ == ["(in the ingest stage 't')"]
    with pytest.raises(ValueError):
        stage.close()
    assert done == [0]


def test_abandoned_stages_finish_the_item_in_hand_and_drop_the_rest() -> None:
    first, second = [], []
    started, release = threading.Event(), threading.Event()

    def slow(item: int) -> None:
        started.set()
        release.wait(10)
        first.append(item)
        downstream.put(item)

    downstream: Stage[int] = Stage("down", second.append, depth=4)
    upstream: Stage[int] = Stage("up", slow, depth=4)
    for item in range(4):
        upstream.put(item)
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    abandon(upstream, downstream)
    assert first == [0] and second in ([], [0])  # item 0 finished; 1-3 never ran


def test_the_next_batch_is_encoded_while_the_last_one_is_written(settings: Settings, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The write of batch 1 waits until the encoder has started on batch 2: a pipeline that encoded and wrote one
    after the other would never get there (the wait would time out)."""
    encoding_second, overlapped = threading.Event(), []
    encodes, writes = [], []
    real_encode, real_write = pipeline.encode_batch, pipeline.write_encoded

    def encode_batch(service, batch):  # type: ignore[no-untyped-def]
        encodes.append(len(batch))
        if len(encodes) == 2:
            encoding_second.set()
        return real_encode(service, batch)

    def write_encoded(service, outcome, *, job_id=None):  # type: ignore[no-untyped-def]
        writes.append(len(outcome.rows))
        if len(writes) == 1:
            overlapped.append(encoding_second.wait(20))
        return real_write(service, outcome, job_id=job_id)

    monkeypatch.setattr(pipeline, "encode_batch", encode_batch)
    monkeypatch.setattr(pipeline, "write_encoded", write_encoded)
    root = tmp_path / "files"
    for i in range(10):
        write_png(root / f"f{i}.png", synthetic_image(200 + i))
    service = SpaceService(settings)  # batches of 4
    report = IngestPipeline(service).run(root)
    assert overlapped == [True]
    assert (report.ingested, report.failed) == (10, 0) and encodes == writes == [4, 4, 2]
    assert service.index.count == 10


def test_a_failure_in_the_write_stage_ends_the_run_with_its_error_and_keeps_what_was_stored(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error outside the per-batch handling (here the index's catch-up) is the run's error, of its own type as
    before the stages; the batch already committed stays stored and the next run adds the rest."""
    root = tmp_path / "files"
    for i in range(10):
        write_png(root / f"f{i}.png", synthetic_image(300 + i))
    service = SpaceService(settings)
    real_catch_up, calls = type(service.index).catch_up, []

    def catch_up(index, store):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_catch_up(index, store)

    monkeypatch.setattr(type(service.index), "catch_up", catch_up)
    with pytest.raises(OSError, match="disk full") as failed:
        IngestPipeline(service).run(root)
    assert failed.value.__notes__ == ["(in the ingest stage 'ingest-write')"]  # where it began, not where it passed
    monkeypatch.undo()
    stored = service.store.counts()["images"]
    assert 4 <= stored < 10
    again = IngestPipeline(service).run(root)
    assert again.ingested == 10 - stored and again.skipped == stored
