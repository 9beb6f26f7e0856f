"""`retrieval ingest --ray` on a local Ray cluster (2 CPUs, no GPU) into PostgreSQL: a killed driver and a killed
encoder worker lose nothing and double nothing, a re-run skips what is stored, SQLite is refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cli_runner import run_cli
from conftest import assert_archive_intact, database_url, db_counts, make_archive
from sqlalchemy import create_engine, text

RAY = str(Path(sys.executable).parent / "ray")
TIMEOUT = 240.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A head node with 2 CPUs on loopback (its own port: Redis may hold Ray's default 6379), torn down afterwards.

    Token authentication is off: the cluster is this test's, on this machine only.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    address = f"127.0.0.1:{_free_port()}"
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": address}
    finally:  # in the background: the next tests need nothing of it, and waiting for it takes seconds
        subprocess.Popen([RAY, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _start_driver(env: dict[str, str], source: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retrieval", "ingest", str(source), "--ray", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=log.open("ab"), start_new_session=True)


def _vectors(env: dict[str, str]) -> int:
    try:
        return db_counts(env)["vectors"]
    except Exception:  # noqa: BLE001 - the driver has not created the schema yet
        return 0


def _wait_for_vectors(env: dict[str, str], process: subprocess.Popen, at_least: int, log: Path) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        count = _vectors(env)
        if count >= at_least:
            return count
        assert process.poll() is None, f"the driver exited before {at_least} vectors were stored:\n{log.read_text()}"
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} vectors after {TIMEOUT} s:\n{log.read_text()}")


def _encoder_workers() -> list[psutil.Process]:
    """The processes of the encode-and-store actors (Ray names them after the stage's class)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("EncodeAndStore" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.parametrize("cli_env", ["postgres"], indirect=True)
def test_killed_driver_then_killed_worker_lose_and_double_nothing(
    cli_env: dict[str, str], ray_cluster: dict[str, str], tmp_path: Path
) -> None:
    files = make_archive(tmp_path / "archive", studies=12, per_study=4)
    (tmp_path / "archive" / "broken.png").write_bytes(b"\x89PNG not really")
    # one transaction per image (many kill points); reconstruction quality scored on the encoder actor
    env = {**cli_env, **ray_cluster, "RETRIEVAL_BATCH_SIZE": "1", "RETRIEVAL_INGEST_QUALITY": "true"}
    log = tmp_path / "ray.log"

    # 1. SIGKILL the driver once some batches are committed: the cluster ends its job; the next run resumes
    driver = _start_driver(env, tmp_path / "archive", log)
    _wait_for_vectors(env, driver, 4, log)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    after_driver_kill = _vectors(env)
    assert 4 <= after_driver_kill < len(files)

    # 2. re-run, and SIGKILL its encoder actor mid-run: Ray restarts it and retries the batch it held
    driver = _start_driver(env, tmp_path / "archive", log)
    at_kill = _wait_for_vectors(env, driver, after_driver_kill + 2, log)
    workers = _encoder_workers()
    assert workers, f"no encoder actor found:\n{log.read_text()}"
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):  # an actor of the killed driver's job, gone meanwhile
            worker.kill()
    assert at_kill < len(files), "the run finished before its worker could be killed"
    stdout, _ = driver.communicate(timeout=TIMEOUT)
    assert driver.returncode == 0, log.read_text()
    report = json.loads(stdout)  # only the report: what Ray prints (a worker's death) goes to stderr
    assert report["failed"] == 1 and report["failures"][0]["source"].endswith("broken.png")
    assert report["failures"][0]["stage"] == "decode"
    # stored by an earlier run (or by a batch whose reply died with its worker): skipped, never stored twice
    assert report["skipped"] >= after_driver_kill
    assert report["ingested"] + report["skipped"] == len(files)
    assert_archive_intact(env, len(files))
    engine = create_engine(database_url(env))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM images WHERE recon_psnr IS NULL")).scalar_one() == 0
    engine.dispose()

    # 3. the space's index is searchable from the database the cluster filled
    hits = json.loads(run_cli(env, "search", str(files[0]), "-k", "3", "--json").stdout)["results"]
    assert hits[0]["images"][0]["source"] == str(files[0])


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)
def test_ray_refuses_sqlite_before_starting_a_cluster(cli_env: dict[str, str], tmp_path: Path) -> None:
    make_archive(tmp_path / "archive", studies=1, per_study=1)
    result = run_cli(cli_env, "ingest", str(tmp_path / "archive"), "--ray", "--json", check=False)
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "invalid_request" and error["detail"]["field"] == "database_url"
    assert "PostgreSQL" in error["message"]
    assert not (Path(cli_env["RETRIEVAL_DATA_DIR"]) / "retrieval.db").exists()  # nothing was created
