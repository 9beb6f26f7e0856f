"""The job queue's claim / heartbeat / cancel rules, and the query micro-batcher."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_settings
from sqlalchemy import update

from retrieval.errors import ConflictError
from retrieval.model.batching import MicroBatcher
from retrieval.storage.jobs import JobQueue, Progress, utcnow
from retrieval.storage.orm import IngestJob
from retrieval.storage.store import Store


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened = Store.open(tiny_settings(tmp_path / "data", url))
    with opened.engine.begin() as connection:
        connection.execute(IngestJob.__table__.delete())
    yield opened
    opened.close()


def test_workers_take_only_jobs_of_their_model(store: Store) -> None:
    queue = JobQueue(store, stale_seconds=60)
    volumes = queue.submit("/data/ct", model="medvae_4_1_3d")
    images = queue.submit("/data/xr", model="medvae_8_4_2d")
    legacy = queue.submit("/data/old")  # queued before jobs named a model: any worker
    assert queue.claim("w2d", model="medvae_8_4_2d").id == images.id
    assert queue.claim("w2d", model="medvae_8_4_2d").id == legacy.id
    assert queue.claim("w2d", model="medvae_8_4_2d") is None  # the 3-D job waits for a 3-D worker
    claimed = queue.claim("w3d", model="medvae_4_1_3d")
    assert claimed.id == volumes.id and claimed.model == "medvae_4_1_3d"


def test_each_job_goes_to_exactly_one_worker(store: Store) -> None:
    queue = JobQueue(store, stale_seconds=60)
    submitted = {queue.submit(f"/data/{n}").id for n in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()

    def drain(worker: str) -> None:
        own = JobQueue(store, stale_seconds=60)
        while (job := own.claim(worker)) is not None:
            with lock:
                claimed.append(job.id)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(drain, [f"w{n}" for n in range(4)]))
    assert sorted(claimed) == sorted(submitted)  # every job once, none twice
    assert queue.claim("late") is None


def test_stale_running_job_is_resumed_and_the_old_owner_loses_it(store: Store) -> None:
    queue = JobQueue(store, stale_seconds=5)
    job = queue.submit("/data/a")
    assert queue.claim("w1").id == job.id
    assert queue.claim("w2") is None  # fresh heartbeat: not claimable
    assert queue.heartbeat(job.id, "w1", Progress(10, 1, 0, 2.0)) == (True, False)
    with store.sessions.begin() as session:  # w1 goes silent for a minute
        session.execute(update(IngestJob).values(heartbeat_at=IngestJob.heartbeat_at - _minutes(1)))
    resumed = queue.claim("w2")
    assert resumed is not None and resumed.attempts == 2 and resumed.worker_id == "w2"
    assert queue.heartbeat(job.id, "w1", None) == (False, False)  # w1 learns it lost the job
    assert not queue.finish(job.id, "w1", state="succeeded", message="late", progress=None)
    assert queue.finish(job.id, "w2", state="succeeded", message="done", progress=Progress(10, 1, 0, 2.0))
    final = queue.get(job.id)
    assert final.state == "succeeded" and final.message == "done" and final.total == 10


def test_cancel_rules(store: Store) -> None:
    queue = JobQueue(store)
    queued = queue.submit("/data/q")
    assert queue.cancel(queued.id).state == "cancelled"
    running = queue.submit("/data/r")
    assert queue.claim("w").id == running.id
    assert queue.cancel(running.id).state == "running"  # the worker stops it after its batch
    assert queue.heartbeat(running.id, "w", None) == (True, True)
    assert queue.finish(running.id, "w", state="cancelled", message="stopped", progress=None)
    with pytest.raises(ConflictError):
        queue.cancel(running.id)
    assert queue.counts_by_state() == {"cancelled": 2}


def test_released_job_goes_back_to_the_queue(store: Store) -> None:
    queue = JobQueue(store)
    job = queue.submit("/data/x")
    queue.claim("w1")
    queue.release(job.id, "w1", Progress(5, 0, 0, 1.0))
    assert queue.get(job.id).state == "queued"
    assert queue.claim("w2").attempts == 2


def test_a_cancel_that_reaches_a_dead_worker_still_ends_the_job(store: Store) -> None:
    """Issue 17.2: cancel-requested jobs whose worker died, or left, end `cancelled` instead of `running` forever."""
    queue = JobQueue(store, stale_seconds=5)
    orphan, silent, leaving = (queue.submit(f"/data/{name}") for name in ("orphan", "silent", "leaving"))
    assert {queue.claim(worker).id for worker in ("w1", "w2", "w3")} == {orphan.id, silent.id, leaving.id}
    assert all(queue.cancel(job.id).state == "running" for job in (orphan, leaving))  # live workers: they stop
    queue.release(leaving.id, queue.get(leaving.id).worker_id, None)  # a worker stopping with a cancel pending
    with store.sessions.begin() as session:  # then every worker goes silent (SIGKILL)
        session.execute(update(IngestJob).values(heartbeat_at=utcnow() - _minutes(1)))
    assert queue.cancel(silent.id).state == "cancelled"  # a stale job is cancelled at once
    assert queue.claim("new-worker") is None  # the new worker ends the orphan instead of resuming it
    for job in (orphan, silent, leaving):
        assert queue.get(job.id).state == "cancelled" and queue.get(job.id).finished_at is not None
    assert queue.counts_by_state() == {"cancelled": 3}


def _minutes(n: int):  # type: ignore[no-untyped-def]
    import datetime as dt

    return dt.timedelta(minutes=n)


def test_micro_batcher_coalesces_and_returns_each_callers_row() -> None:
    sizes: list[int] = []

    def encode(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.05)  # long enough for the other callers to queue up
        return batch * 2, batch.sum(axis=(1, 2))

    batcher = MicroBatcher(encode, max_batch=8, wait_seconds=0.02, on_batch=sizes.append)
    images = [np.full((4, 4), float(n), np.float32) for n in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher.submit, images))
    batcher.close()
    for n, (z, vector) in enumerate(results):
        assert np.all(z == 2 * n) and vector == 16 * n
    assert sum(sizes) == 16 and max(sizes) > 1 and max(sizes) <= 8


def test_micro_batcher_hands_errors_to_every_caller() -> None:
    def broken(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("encoder exploded")

    batcher = MicroBatcher(broken, max_batch=4, wait_seconds=0.01)
    with pytest.raises(RuntimeError, match="exploded"):
        batcher.submit(np.zeros((2, 2), np.float32))
    batcher.close()


def test_batched_queries_equal_single_queries(tmp_path: Path) -> None:
    from conftest import synthetic_image

    from retrieval.service import SpaceService

    single = SpaceService(tiny_settings(tmp_path / "a", query_batching="off"))
    batched = SpaceService(tiny_settings(tmp_path / "b", query_batching="on", query_batch_wait_ms=20))
    images = [synthetic_image(n, size=64) for n in range(6)]  # [0, 1], as fit_to_square gives
    expected = [single.embed_query(image)[1] for image in images]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda image: batched.embed_query(image)[1], images))
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5)
    single.close()
    batched.close()
