"""Load on loopback while an ingest job runs: N clients mixing search, preview and study reads.

Starts `retrieval serve` and `retrieval worker` processes over a fresh SQLite (or ``--database-url``)
archive seeded with a first ingest, submits a second ingest job, then runs ``--clients`` threads
for ``--seconds``. Each client loops over: search by upload (a small PNG), search by a stored
image id, a preview PNG and a study of a result, and fetches every image id a search returned
(``GET /v1/images/{id}``) to prove searches never return an id the database does not hold.
Reports per-kind p50 / p99, requests/s, errors, and the job's progress during the run.

    python -m bench.load --clients 20 --seconds 60
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.results_io import write_result
from bench.server import bench_env, start_server


def _archive(folder: Path, studies: int, per_study: int, seed: int) -> None:
    from PIL import Image

    from retrieval.ops.sample import study_variant, synthetic_chest

    rng = np.random.default_rng(seed)
    for s in range(studies):
        variant = study_variant(rng)
        for i in range(per_study):
            pixels = synthetic_chest(rng, 256, variant=variant)
            target = folder / f"study_{seed}_{s}" / f"img_{i}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((pixels * 65535).astype(np.uint16)).save(target)


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


class Recorder:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.returned_ids: set[int] = set()
        self.missing_ids: list[int] = []
        self.lock = threading.Lock()

    def add(self, kind: str, seconds: float, response: httpx.Response) -> None:
        with self.lock:
            if response.status_code >= 400:
                self.errors.append(f"{kind} {response.status_code}: {response.text[:160]}")
            else:
                self.latency[kind].append(seconds)


def _client(base: str, queries: list[bytes], stop_at: float, record: Recorder, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as session:

        def timed(kind: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
            tick = time.perf_counter()
            response = session.request(method, url, **kwargs)
            record.add(kind, time.perf_counter() - tick, response)
            return response

        last_ids = [1]
        while time.monotonic() < stop_at:
            choice = rng.random()
            if choice < 0.35:
                response = timed("search_upload", "POST", "/v1/search",
                                 files={"file": ("q.png", rng.choice(queries), "image/png")}, data={"k": "5"})
            elif choice < 0.55:
                response = timed("search_id", "POST", "/v1/search", json={"image_id": rng.choice(last_ids), "k": 5})
            elif choice < 0.8:
                timed("preview", "GET", f"/v1/images/{rng.choice(last_ids)}/preview.png")
                continue
            else:
                timed("study", "GET", f"/v1/images/{rng.choice(last_ids)}")
                continue
            if response.status_code != 200:
                continue
            ids = [image["image_id"] for result in response.json()["results"] for image in result["images"]]
            last_ids = ids or last_ids
            for image_id in ids:  # every returned id must exist in the database right now
                check = session.get(f"/v1/images/{image_id}")
                if check.status_code != 200:
                    with record.lock:
                        record.missing_ids.append(image_id)
            with record.lock:
                record.returned_ids.update(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--seed-images", type=int, default=60)
    parser.add_argument("--job-images", type=int, default=400)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--query-batching", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        env = bench_env(RETRIEVAL_DATA_DIR=str(scratch / "data"), RETRIEVAL_WEIGHTS="random",
                        RETRIEVAL_INPUT_SIZE=str(args.input_size), RETRIEVAL_INGEST_ROOTS=str(scratch),
                        RETRIEVAL_ID_SECRET="load-test-secret", RETRIEVAL_DECODE_WORKERS="1",
                        RETRIEVAL_QUERY_BATCHING=args.query_batching)
        if args.database_url:
            env["RETRIEVAL_DATABASE_URL"] = args.database_url
        _archive(scratch / "seed", args.seed_images // 3, 3, seed=1)
        _archive(scratch / "job", args.job_images // 4, 4, seed=2)
        subprocess.run([sys.executable, "-m", "retrieval", "ingest", str(scratch / "seed"), "--no-progress"],
                       env=env, check=True, capture_output=True)
        queries = [_png_bytes(p) for p in sorted((scratch / "seed").rglob("*.png"))[:8]]
        server, base = start_server(env)
        worker = subprocess.Popen([sys.executable, "-m", "retrieval", "worker"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            job = httpx.post(f"{base}/v1/ingest-jobs", json={"source": str(scratch / "job")}, timeout=30).json()
            while httpx.get(f"{base}/v1/ingest-jobs/{job['job_id']}", timeout=30).json()["state"] == "queued":
                time.sleep(0.2)
            before = httpx.get(f"{base}/v1/ingest-jobs/{job['job_id']}", timeout=30).json()
            record = Recorder()
            stop_at = time.monotonic() + args.seconds
            started = time.perf_counter()
            threads = [threading.Thread(target=_client, args=(base, queries, stop_at, record, n))
                       for n in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            after = httpx.get(f"{base}/v1/ingest-jobs/{job['job_id']}", timeout=30).json()
        finally:
            worker.terminate()
            server.terminate()
            worker.wait(timeout=120)
            server.wait(timeout=60)
    kinds = {}
    for kind, values in sorted(record.latency.items()):
        ms = np.array(values) * 1e3
        kinds[kind] = {"requests": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                       "p99_ms": round(float(np.percentile(ms, 99)), 1)}
    total = sum(k["requests"] for k in kinds.values())
    result = {
        "benchmark": "load",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "database": "postgresql" if args.database_url else "sqlite",
        "clients": args.clients,
        "seconds": args.seconds,
        "input_size": args.input_size,
        "query_batching": args.query_batching,
        "requests": total,
        "requests_per_s": round(total / wall, 2),
        "errors": len(record.errors),
        "error_samples": record.errors[:5],
        "distinct_ids_returned": len(record.returned_ids),
        "ids_missing_from_database": len(record.missing_ids),
        "job_ingested_during_run": after["counts"]["ingested"] - before["counts"]["ingested"],
        "job_state_after": after["state"],
        "kinds": kinds,
    }
    print("\n| request | count | p50 ms | p99 ms |\n| --- | --- | --- | --- |")
    for kind, row in kinds.items():
        print(f"| {kind} | {row['requests']} | {row['p50_ms']} | {row['p99_ms']} |")
    print(f"\n{total} requests in {wall:.0f} s ({result['requests_per_s']}/s), errors {result['errors']}, "
          f"ids missing from the database {result['ids_missing_from_database']}, "
          f"job stored {result['job_ingested_during_run']} images meanwhile ({after['state']})")
    print(f"wrote {write_result(args.out, 'load', result)}")


if __name__ == "__main__":
    main()
