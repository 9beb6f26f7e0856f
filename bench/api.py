"""`POST /v1/search` over loopback with a 2048x2048 16-bit PNG: latency and throughput at 1, 4, 16 clients.

Starts a real `retrieval serve` process on a free loopback port over a small ingested archive
(random weights unless ``--weights`` names a checkpoint), then, per concurrency level, runs that
many clients in threads for ``--seconds`` (each sends its next request when the last one
answered) and reports p50 / p99 latency, requests/s and errors.

    python -m bench.api --clients 1,4,16 --seconds 60 --input-size 384
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.results_io import write_result
from bench.server import bench_env, start_server


def _query_png(size: int) -> bytes:
    from PIL import Image

    from retrieval.ops.sample import synthetic_chest

    pixels = synthetic_chest(np.random.default_rng(5), size)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _start_server(data_dir: Path, env_overrides: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Ingest the sample set into ``data_dir`` and serve it."""
    from retrieval.ops.sample import write_sample_set

    env = bench_env(RETRIEVAL_DATA_DIR=str(data_dir / "data"), **env_overrides)
    write_sample_set(data_dir / "archive")
    subprocess.run([sys.executable, "-m", "retrieval", "ingest", str(data_dir / "archive"), "--no-progress"],
                   env=env, check=True, capture_output=True)
    return start_server(env)


def _level(base: str, png: bytes, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=600) as session:
            while time.monotonic() < stop_at:
                tick = time.perf_counter()
                response = session.post("/v1/search", files={"file": ("q.png", png, "image/png")}, data={"k": "10"})
                elapsed = time.perf_counter() - tick
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{response.status_code}: {response.text[:200]}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "requests_per_s": round(len(latencies) / wall, 3),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--input-size", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="api", help="result file: <out>/<name>-<date>.json")
    args = parser.parse_args()
    png = _query_png(args.image_size)
    overrides = {"RETRIEVAL_WEIGHTS": args.weights, "RETRIEVAL_INPUT_SIZE": str(args.input_size)}
    with tempfile.TemporaryDirectory() as scratch:
        process, base = _start_server(Path(scratch), overrides)
        try:
            # warm-up; its previews inline, so that their one decode (each preview is decoded once and kept) is
            # done before the clock starts instead of holding the encoder during the first timed requests
            httpx.post(f"{base}/v1/search", files={"file": ("q.png", png, "image/png")}, data={"k": "10", "previews": "inline"},
                       timeout=600)
            rows = []
            for clients in (int(c) for c in args.clients.split(",")):
                row = _level(base, png, clients, args.seconds)
                rows.append(row)
                print(row, flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    result = {
        "benchmark": "api",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "query": f"{args.image_size}x{args.image_size} 16-bit PNG ({len(png)} bytes)",
        "input_size": args.input_size,
        "weights": args.weights,
        "seconds_per_level": args.seconds,
        "rows": rows,
    }
    print("\n| clients | requests | errors | p50 ms | p99 ms | requests/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['errors']} | {row['p50_ms']} | {row['p99_ms']} "
              f"| {row['requests_per_s']} |")
    print(f"\nwrote {write_result(args.out, args.name, result)}")


if __name__ == "__main__":
    main()
