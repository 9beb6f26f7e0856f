"""Real `python -m retrieval serve` processes on a free loopback port, for the browser and fuzz tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The process environment for tiny settings on the fake encoder (64 px; ``RETRIEVAL_WEIGHTS=random`` in
    ``overrides`` for real MedVAE, fp32, PyTorch runtime), no inherited RETRIEVAL_*. (The OpenVINO runtime has
    its own tests; converting per data folder would slow every test.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    env.update(
        RETRIEVAL_DATA_DIR=str(data_dir), RETRIEVAL_WEIGHTS="fake", RETRIEVAL_SEED="0", RETRIEVAL_INPUT_SIZE="64",
        RETRIEVAL_PRECISION="fp32", RETRIEVAL_BATCH_SIZE="4", RETRIEVAL_DECODE_WORKERS="0", HF_HUB_OFFLINE="1",
        RETRIEVAL_ID_SECRET="test-secret-not-for-production", RETRIEVAL_RUNTIME="torch",
    )
    env.update(overrides)
    return env


def wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Until ``/readyz`` answers 200; fails with the server's log when it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"server not ready:\n{log.read_text()[-3000:]}")


@contextmanager
def running_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """Start `retrieval serve`, yield its base URL once ready, stop it at the end."""
    port = free_port()
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", "--port", str(port)], env=env,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, process, log)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)
