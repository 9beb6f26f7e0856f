"""`retrieval serve` and `retrieval worker` as real processes: jobs over HTTP, a worker SIGKILLed mid-job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import db_counts, make_archive
from live_server import free_port, wait_ready
from PIL import Image


def start(env: dict[str, str], *args: str, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "retrieval", *args], env=env, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
    process.wait(timeout=60)


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(cli_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[httpx.Client, dict[str, str], Path]]:
    roots = tmp_path / "incoming"
    roots.mkdir()
    env = dict(cli_env, RETRIEVAL_INGEST_ROOTS=str(roots), RETRIEVAL_JOB_HEARTBEAT_SECONDS="0.3",
               RETRIEVAL_JOB_STALE_SECONDS="2", RETRIEVAL_BATCH_SIZE="1", RETRIEVAL_DECODE_WORKERS="0")
    port = free_port()
    process = start(env, "serve", "--port", str(port), log=tmp_path / "serve.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, tmp_path / "serve.log")
        yield client, env, roots
    finally:
        client.close()
        stop(process)


def test_job_over_http_survives_a_killed_worker(server: tuple[httpx.Client, dict[str, str], Path], tmp_path: Path) -> None:
    client, env, roots = server
    files = make_archive(roots / "archive", studies=6, per_study=5)

    refused = client.post("/v1/ingest-jobs", json={"source": str(tmp_path)})
    assert refused.status_code == 403 and "outside the allowed ingest roots" in refused.json()["error"]["message"]

    submitted = client.post("/v1/ingest-jobs", json={"source": str(roots / "archive")})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    assert submitted.json()["state"] == "queued"
    time.sleep(0.5)
    assert client.get(f"/v1/ingest-jobs/{job_id}").json()["state"] == "queued"  # the API never runs it

    first = start(env, "worker", "--poll", "0.2", log=tmp_path / "worker1.log")
    try:
        stored = wait_until(lambda: db_counts(env)["vectors"] >= 5 and db_counts(env)["vectors"], timeout=180,
                            what="the first worker to store 5 images")
        running = client.get(f"/v1/ingest-jobs/{job_id}").json()
        assert running["state"] == "running" and running["attempts"] == 1
    finally:
        stop(first, signal.SIGKILL)
    killed_at = db_counts(env)["vectors"]
    assert 5 <= stored <= killed_at < len(files), "the kill must land mid-job"

    second = start(env, "worker", "--poll", "0.2", log=tmp_path / "worker2.log")
    try:
        done = wait_until(
            lambda: (job := client.get(f"/v1/ingest-jobs/{job_id}").json())["state"] in {"succeeded", "failed"} and job,
            timeout=240, what="the job to finish after the restart", interval=0.3,
        )
    finally:
        stop(second)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2 and done["counts"]["ingested"] == len(files) and done["counts"]["failed"] == 0
    assert done["failures"] == [] and done["images_per_second"] > 0
    counted = done["counts"]  # issue 17: the message tells the counts over both attempts, as the counts do
    assert done["message"] == f"ingested {counted['ingested']}, skipped {counted['skipped']}, failed 0", done
    counts = db_counts(env)
    assert counts["images"] == counts["distinct_sha"] == counts["vectors"] == counts["latents"] == len(files)

    # the server picks up what the worker stored without a restart
    query = files[7]
    found = client.post("/v1/search", files={"file": ("q.png", query.read_bytes(), "image/png")}, data={"k": "3"})
    assert found.status_code == 200, found.text
    top = found.json()["results"][0]
    assert top["study"]["label"] == "study_1" and top["score"] > 0.9999
    image_id = top["images"][0]["image_id"]
    by_id = client.post("/v1/search", json={"image_id": image_id, "k": 2}).json()
    assert by_id["results"][0]["images"][0]["image_id"] == image_id
    preview = client.get(top["images"][0]["preview_url"])
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    png_path = tmp_path / "preview.png"
    png_path.write_bytes(preview.content)
    assert Image.open(png_path).size == (64, 64)
    ready = client.get("/readyz").json()
    assert ready["checks"]["index_consistent"] is True
    metrics = client.get("/metrics").text
    assert 'medvae_ingest_jobs{state="succeeded"} 1.0' in metrics
    assert f'medvae_ingest_images_total{{outcome="ingested"}} {float(len(files))}' in metrics


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # the queue's cancel rules run on PG in test_jobs.py
def test_cancel_a_running_job(server: tuple[httpx.Client, dict[str, str], Path], tmp_path: Path) -> None:
    client, env, roots = server
    files = make_archive(roots / "archive", studies=8, per_study=5)
    job_id = client.post("/v1/ingest-jobs", json={"source": str(roots / "archive")}).json()["job_id"]
    # real MedVAE (random weights) in the worker: the fake encoder would finish the job before the cancel lands
    worker = start({**env, "RETRIEVAL_WEIGHTS": "random"}, "worker", "--poll", "0.2", log=tmp_path / "worker.log")
    try:
        wait_until(lambda: db_counts(env)["vectors"] >= 2, timeout=180, what="the worker to start storing")
        cancel = client.delete(f"/v1/ingest-jobs/{job_id}")
        assert cancel.status_code == 202 and cancel.json()["cancel_requested"] is True
        done = wait_until(
            lambda: (job := client.get(f"/v1/ingest-jobs/{job_id}").json())["state"] != "running" and job,
            timeout=60, what="the worker to stop the cancelled job", interval=0.2,
        )
        assert done["state"] == "cancelled" and done["counts"]["ingested"] < len(files)
        assert client.delete(f"/v1/ingest-jobs/{job_id}").status_code == 409
        assert worker.poll() is None  # the worker lives on, waiting for the next job
    finally:
        stop(worker)
    assert worker.returncode == 0
    counts = db_counts(env)
    assert counts["images"] == counts["vectors"] == counts["latents"] == done["counts"]["ingested"]
