"""SIGKILL `retrieval ingest` and `retrieval reindex` at seeded random moments; nothing is lost or doubled."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from conftest import assert_archive_intact, db_counts, make_archive

KILLS = 10
pytestmark = pytest.mark.usefixtures("no_semaphores_left_by_the_killed")


def _start(env: dict[str, str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retrieval", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _kill_after(env: dict[str, str], args: list[str], delay: float) -> None:
    process = _start(env, args)
    time.sleep(delay)
    _kill(process)


def _stored_vectors(env: dict[str, str]) -> int:
    try:
        return db_counts(env)["vectors"]
    except Exception:  # killed before the schema existed
        return 0


def _kill_after_progress(env: dict[str, str], args: list[str], new_vectors: int, extra_delay: float,
                         timeout: float = 180.0) -> None:
    """Start `args`, wait until `new_vectors` more vectors are committed, then SIGKILL after `extra_delay`.

    Waiting on the database rather than on the clock keeps the kill mid-ingest however slow the
    machine starts Python and the model.
    """
    before = _stored_vectors(env)
    process = _start(env, args)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if _stored_vectors(env) >= before + new_vectors:
            time.sleep(extra_delay)
            break
        time.sleep(0.1)
    _kill(process)


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # PG under SIGKILL is covered by test_cli_end_to_end's kill test
def test_ingest_killed_ten_times_then_finished(cli_env: dict[str, str], tmp_path: Path) -> None:
    files = make_archive(tmp_path / "archive", studies=10, per_study=4)
    # real MedVAE (random weights): the fake encoder stores 40 images before a kill can land mid-ingest
    env = dict(cli_env, RETRIEVAL_BATCH_SIZE="1", RETRIEVAL_WEIGHTS="random")
    rng = random.Random(20261122)
    args = ["ingest", str(tmp_path / "archive"), "--no-progress"]
    stored_after_kills = []
    for kill in range(KILLS):
        if kill % 4 == 0:  # some kills land during start-up or the first batch
            _kill_after(env, args, rng.uniform(0.5, 4.0))
        else:  # the rest after a few committed batches, somewhere inside the next one
            _kill_after_progress(env, args, rng.randint(1, 3), rng.uniform(0.0, 0.8))
        stored_after_kills.append(_stored_vectors(env))
    assert any(0 < n < len(files) for n in stored_after_kills), f"no kill landed mid-ingest: {stored_after_kills}"
    assert stored_after_kills == sorted(stored_after_kills), f"a kill lost stored vectors: {stored_after_kills}"
    final = run_cli(env, "ingest", str(tmp_path / "archive"), "--no-progress")
    assert "failed 0" in final.stdout
    assert_archive_intact(env, len(files))


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # reindex touches index files only; PG adds nothing
def test_reindex_killed_keeps_a_serving_index(cli_env: dict[str, str], tmp_path: Path) -> None:
    files = make_archive(tmp_path / "archive", studies=6, per_study=4)
    run_cli(cli_env, "ingest", str(tmp_path / "archive"), "--no-progress")
    query = files[5]
    before = json.loads(run_cli(cli_env, "search", str(query), "-k", "3", "--json").stdout)["results"]
    rng = random.Random(7)
    for _ in range(3):
        _kill_after(cli_env, ["reindex"], rng.uniform(1.0, 5.0))
        assert_archive_intact(cli_env, len(files))
    after = json.loads(run_cli(cli_env, "search", str(query), "-k", "3", "--json").stdout)["results"]
    assert [r["study"]["study_id"] for r in after] == [r["study"]["study_id"] for r in before]
    assert np.allclose([r["score"] for r in after], [r["score"] for r in before], atol=1e-6)


def _session_members(session_id: int) -> dict[int, str]:
    """Live processes of a session (Linux /proc): pid -> command line."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session_id and fields[0] != "Z":
                members[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
    return members


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # process clean-up does not touch the database
def test_sigkill_of_ingest_alone_leaves_no_decode_helper_behind(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Issue 17.7: only the ingest process is killed (not its group); its forkserver, decode workers and
    resource tracker must end by themselves."""
    make_archive(tmp_path / "archive", studies=10, per_study=4)
    env = dict(cli_env, RETRIEVAL_DECODE_WORKERS="2", RETRIEVAL_BATCH_SIZE="1", RETRIEVAL_WEIGHTS="random")
    process = _start(env, ["ingest", str(tmp_path / "archive"), "--no-progress"])
    deadline = time.monotonic() + 120
    while len(_session_members(process.pid)) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)  # main + resource tracker + forkserver + two decode workers
    helpers = len(_session_members(process.pid)) - 1
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert helpers >= 4, f"the decode helpers never started: {_session_members(process.pid)}"
    deadline = time.monotonic() + 15
    while _session_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _session_members(process.pid)
    for pid in left:  # never leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"helpers outlived the killed ingest: {left}"
