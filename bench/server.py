"""A `retrieval serve` process on a free loopback port, for the HTTP benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def bench_env(**settings: str) -> dict[str, str]:
    """This process's environment without inherited RETRIEVAL_* settings, plus ``settings``, offline hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    env.update(HF_HUB_OFFLINE="1", **settings)
    return env


def start_server(env: dict[str, str], *, timeout: float = 300) -> tuple[subprocess.Popen[bytes], str]:
    """Start `retrieval serve` and return it with its base URL once ``/readyz`` answers 200.

    Raises RuntimeError (after killing it) when it does not get ready in ``timeout`` seconds.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = subprocess.Popen([sys.executable, "-m", "retrieval", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("retrieval serve did not become ready")
