"""Search speed and quality of the index types the service chooses between, at 10k / 100k / 1M vectors.

Data: structured synthetic vectors shaped like pooled MedVAE latents, not uniform random (a worst
case for any ANN index). Each vector = a shared mean direction (pooled X-ray latents are all
alike: cosine 0.9+ between unrelated images) + a low-rank "anatomy" part (16 factors with
decaying scales) + one of ``n/100`` cluster offsets ("patients/devices") + isotropic noise,
then L2-normalised, as the pipeline's vectors are. Queries are fresh draws from the same
distribution (not in the index); ground truth is exact inner-product search.

For each size and index type it reports build time, index bytes, batch-1 latency p50/p99 (one
thread: the API serves one query per request), batch-1 QPS, and recall@10 against exact search.

    python -m bench.search --sizes 10000,100000,1000000
    python -m bench.search --filtered 1000000 --queries 200   # cohorts at 50 / 10 / 1 / 0.1 %
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.results_io import write_result
from retrieval.storage import faiss_gpu
from retrieval.storage.index import EXACT_COHORT_MAX, IndexSpec, SpaceIndex
from retrieval.storage.index_spec import training_step
from retrieval.storage.mapped_ivf import MappedIVF
from retrieval.storage.store import StoredVector

DIM = 84  # spp:1,2,4 over 4 channels, the default pooling


@dataclass
class FakeSpace:
    """The attributes SpaceIndex needs of a space row."""

    key: str
    dim: int
    id: int = 0


def structured_vectors(count: int, seed: int, *, clusters: int, dim: int = DIM, out: np.ndarray | None = None) -> np.ndarray:
    """``count`` vectors of ``dim`` values, made 100k at a time into ``out`` (a memory map for 10M x 512)."""
    rng = np.random.default_rng(seed)
    layout = np.random.default_rng(12345)  # the same "archive structure" for data and queries
    mean = np.abs(layout.normal(size=dim)).astype(np.float32) * 3.0
    factors = layout.normal(size=(16, dim)).astype(np.float32)
    scales = (0.9 ** np.arange(16)).astype(np.float32)
    centres = layout.normal(size=(clusters, dim)).astype(np.float32) * 0.35
    out = np.empty((count, dim), np.float32) if out is None else out
    step = 100_000
    for start in range(0, count, step):
        n = min(step, count - start)
        part = mean + (rng.normal(size=(n, 16)).astype(np.float32) * scales) @ factors
        part += centres[rng.integers(0, clusters, size=n)]
        part += rng.normal(size=(n, dim)).astype(np.float32) * 0.15
        faiss.normalize_L2(part)
        out[start : start + n] = part
    return out


def exact_top10(data: np.ndarray, queries: np.ndarray, *, chunk: int = 1_000_000) -> np.ndarray:
    """Ground truth: ids (row + 1) of each query's 10 best inner products, by exact search over ``chunk`` rows at
    a time (so 20 GB of memory-mapped vectors are read once, never held)."""
    best = faiss.ResultHeap(len(queries), 10, keep_max=True)  # merges each chunk's top 10 into the running one
    for start in range(0, len(data), chunk):
        part = np.ascontiguousarray(data[start : start + chunk])
        scores, rows = faiss_gpu.knn(queries, part, 10)
        best.add_result(scores, rows + start + 1)
    best.finalize()
    return best.I


@dataclass
class ArrayStore:
    """Stands in for the database as the source of exact vectors that IVF-PQ re-scores with (ids are row + 1)."""

    vectors: np.ndarray

    def vectors_of(self, _space_id: int, image_ids: list[int]) -> np.ndarray:
        return self.vectors[np.asarray(image_ids) - 1]


def build(spec: IndexSpec, vectors: np.ndarray, directory: Path) -> tuple[SpaceIndex, float]:
    """The index of ``spec`` over ``vectors``; an IVF-PQ one trained first on an even sample of them, as
    ``SpaceIndex.rebuild`` trains it, then saved and mapped back from its files, as a server opens it (build time
    includes training and the save)."""
    dim = vectors.shape[1]
    index = SpaceIndex(space=FakeSpace(key=f"bench-{spec.name}-{dim}", dim=dim), directory=directory, spec=spec)  # type: ignore[arg-type]
    index._store = ArrayStore(vectors)  # type: ignore[assignment]
    tick = time.perf_counter()
    if not index.index.is_trained:
        index.index.train(vectors[:: training_step(len(vectors))])
    step = 50_000
    for start in range(0, len(vectors), step):
        chunk = np.asarray(vectors[start : start + step])
        index.add([StoredVector(start + i + 1, start + i + 1, row) for i, row in enumerate(chunk)])
    if isinstance(index.index, MappedIVF):
        index.save(force=True)
        index.index = MappedIVF.load(index.index_path)  # lists mapped from the file; nothing of the build kept
    return index, time.perf_counter() - tick


def measure(index: SpaceIndex, queries: np.ndarray, truth: np.ndarray, *, ef_search: int | None) -> dict[str, Any]:
    latencies = []
    found = []
    for query in queries:
        tick = time.perf_counter()
        hits = index.search(query, 10, ef_search=ef_search)[0]
        latencies.append(time.perf_counter() - tick)
        found.append([image_id for image_id, _ in hits])
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    ms = np.array(latencies) * 1e3
    return {
        "ef_search": ef_search,
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "qps_batch1": round(float(1e3 / ms.mean()), 1),
        "recall_at_10": round(recall, 4),
    }


IVFPQ_VARIANTS = ((8, 10), (32, 10), (32, 256), (64, 256), (64, 1024), (128, 1024))
"""(nprobe, rescore) pairs measured for IVF-PQ: rescore 10 = its own top 10 re-ordered by exact scores only."""


def _variants(spec: IndexSpec, ef_values: list[int]) -> list[tuple[IndexSpec, int | None]]:
    """The search settings measured per index: every efSearch for HNSW, (nprobe, rescore) pairs for IVF-PQ."""
    if spec.kind == "hnsw":
        return [(spec, ef) for ef in ef_values]
    if spec.kind == "ivfpq":
        return [(replace(spec, nprobe=nprobe, rescore=rescore), None) for nprobe, rescore in IVFPQ_VARIANTS]
    return [(spec, None)]


IVFPQ_FORMS = {
    "plain": {"opq": False, "coarse_hnsw": False},
    "opq": {"opq": True, "coarse_hnsw": False},
    "hnsw": {"opq": False, "coarse_hnsw": True},
    "opq+hnsw": {"opq": True, "coarse_hnsw": True},
}
"""``--ivfpq-forms``: IVF-PQ with and without its refinements (OPQ, lists through an HNSW graph), beside the default."""


def _specs(size: int, dim: int, ivfpq_forms: list[str]) -> list[IndexSpec]:
    default = IndexSpec.ivfpq(size, dim)
    forms = [replace(default, **IVFPQ_FORMS[name]) for name in ivfpq_forms]
    return [IndexSpec.flat(), IndexSpec.hnsw(), *(forms or [default])]


def run(sizes: list[int], queries_count: int, ef_values: list[int], out_dir: Path,
        kinds: tuple[str, ...] = ("flat", "hnsw", "ivfpq"), *, dim: int = DIM, memory_gb: float = 20.0,
        ivfpq_forms: list[str] | None = None) -> dict[str, Any]:
    """Build and measure each index type at each size. Vectors over :data:`IN_MEMORY_MAX` bytes live in a memory
    map on disk (10M x 512 is 20 GB); an index whose own memory would exceed ``memory_gb`` is not built, and its
    row says how much it would need."""
    faiss.omp_set_num_threads(1)  # batch-1 latency as one request sees it
    rows = []
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-search"
    workdir.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        data = _data(size, dim, workdir)
        queries = structured_vectors(queries_count, seed=2, clusters=max(10, size // 100), dim=dim)
        truth = exact_top10(data, queries)
        for spec in _specs(size, dim, ivfpq_forms or []):
            if spec.kind not in kinds:
                continue
            needed_gb = size * spec.bytes_per_vector(dim) / 2**30
            if needed_gb > memory_gb:
                row = {"vectors": size, "index": spec.name, "skipped": f"needs {needed_gb:.1f} GB > {memory_gb} GB"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            faiss.omp_set_num_threads(os.cpu_count() or 1)  # build on every core
            index, seconds = build(spec, data, workdir)
            faiss.omp_set_num_threads(1)
            index_mb = _index_mb(index, workdir)
            for variant, ef in _variants(spec, ef_values):
                index.spec = variant
                row = {"vectors": size, "index": spec.name, "build_s": round(seconds, 2), "index_mb": index_mb}
                if variant.kind == "ivfpq":
                    row |= {"nprobe": variant.nprobe, "rescore": variant.rescore}
                row.update(measure(index, queries, truth, ef_search=ef))
                row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
                row |= _resident_mb()
                rows.append(row)
                print(json.dumps(row), flush=True)
            del index
        if isinstance(data, np.memmap):
            path = Path(data.filename)
            del data
            path.unlink(missing_ok=True)
    return {
        "benchmark": "search",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "faiss": faiss.__version__,
        "dim": dim,
        "queries": queries_count,
        "data": "structured synthetic (shared mean + 16-factor low rank + size/100 clusters + noise), L2-normalised",
        "rows": rows,
    }


IN_MEMORY_MAX = 4 * 2**30
"""Synthetic archives larger than this (bytes of float32) are written to a memory map on disk, not held."""


def _data(size: int, dim: int, workdir: Path) -> np.ndarray:
    clusters = max(10, size // 100)
    if size * dim * 4 <= IN_MEMORY_MAX:
        return structured_vectors(size, seed=1, clusters=clusters, dim=dim)
    mapped = np.lib.format.open_memmap(workdir / f"vectors-{size}x{dim}.npy", mode="w+", dtype=np.float32, shape=(size, dim))
    structured_vectors(size, seed=1, clusters=clusters, dim=dim, out=mapped)
    mapped.flush()
    return mapped


def _resident_mb() -> dict[str, float]:
    """This process's resident memory now, split as Linux counts it: ``private_mb`` (RssAnon: its own heap, which
    holds flat and HNSW indexes and the benchmark's data) and ``mapped_files_mb`` (RssFile: pages of mapped files,
    an IVF-PQ index's lists among them, shared with every process mapping them)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"private_mb": round(int(fields["RssAnon"].split()[0]) / 1024, 1),
            "mapped_files_mb": round(int(fields["RssFile"].split()[0]) / 1024, 1)}


def _index_mb(index: SpaceIndex, workdir: Path) -> float:
    """The index's size as FAISS writes it (to a file: serialising a 6 GB index in memory would double it); an
    IVF-PQ index's files as saved (structure and mapped lists)."""
    if isinstance(index.index, MappedIVF) and index.index.data_path is not None:
        return round((index.index_path.stat().st_size + index.index.data_path.stat().st_size) / 2**20, 1)
    path = workdir / "measure.faissindex"
    faiss.write_index(index.index, str(path))
    size = path.stat().st_size
    path.unlink()
    return round(size / 2**20, 1)


# -- filtered cohorts (issue 15): the service's path per selectivity, against exact filtered search

MODALITY_SHARES = (("NM", 0.001), ("XA", 0.009), ("CT", 0.09), ("MR", 0.4), ("CR", 0.5))
COHORTS = {0.001: {"NM"}, 0.01: {"NM", "XA"}, 0.1: {"NM", "XA", "CT"}, 0.5: {"NM", "XA", "CT", "MR"}}
"""Selectivity -> the modality filter that selects exactly that fraction of the archive."""


def _fill_store(store: Any, space: Any, modalities: np.ndarray) -> None:
    """``len(modalities)`` image rows (ids 1..n), one study per 10, and a vector row each, by bulk insert."""
    from sqlalchemy import insert

    from retrieval.storage.orm import ImageRecord, Study, Vector

    n, step = len(modalities), 100_000
    with store.engine.begin() as connection:
        connection.execute(insert(Study), [{"id": i + 1, "study_key": f"s{i}", "label": f"s{i}"} for i in range(n // 10 + 1)])
        for start in range(0, n, step):
            ids = range(start + 1, min(n, start + step) + 1)
            connection.execute(insert(ImageRecord), [
                {"id": i, "study_id": (i - 1) // 10 + 1, "source_uri": f"/a/{i}.png", "sha256": f"{i:064x}", "kind": "png",
                 "modality": str(modalities[i - 1]), "width": 1, "height": 1, "frames": 1, "labels": [], "extra": {}}
                for i in ids])
            connection.execute(insert(Vector), [{"image_id": i, "space_id": space.id, "data": b""} for i in ids])


def run_filtered(size: int, queries_count: int, out_dir: Path) -> dict[str, Any]:
    """The service's filtered search at 50 / 10 / 1 / 0.1 % selectivity on ``size`` vectors (HNSW, as the
    service chooses at this size): the SQL half (``cohort_image_ids`` on SQLite), then the index half
    (exact among a cohort of at most ``EXACT_COHORT_MAX``, FAISS's ID selector up to 10 %, post-filtering
    with a widening fetch above), with recall@10 against exact search restricted to the cohort."""
    import tempfile

    from retrieval.config import Settings
    from retrieval.domain.filters import Filters
    from retrieval.domain.spaces import SpaceIdentity
    from retrieval.storage.cohorts import cohort_image_ids
    from retrieval.storage.store import Store

    rng = np.random.default_rng(3)
    names, shares = zip(*MODALITY_SHARES, strict=True)
    modalities = np.array(names)[rng.permutation(np.repeat(np.arange(len(names)), np.round(np.array(shares) * size).astype(int)))]
    data = structured_vectors(size, seed=1, clusters=max(10, size // 100))
    queries = structured_vectors(queries_count, seed=2, clusters=max(10, size // 100))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-search"
    index, build_s = build(IndexSpec.hnsw(), data, workdir)
    faiss.omp_set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(Settings(data_dir=Path(folder), id_secret="bench"))
        space = store.ensure_space(SpaceIdentity("bench", "bench", 384, "v2", "spp:1,2,4", DIM))
        tick = time.perf_counter()
        _fill_store(store, space, modalities)
        print(f"{size:,} rows stored in {time.perf_counter() - tick:.0f} s; HNSW built in {build_s:.0f} s", flush=True)
        for selectivity, wanted in sorted(COHORTS.items(), reverse=True):
            members = np.flatnonzero(np.isin(modalities, sorted(wanted))) + 1  # image ids
            exact = data[members - 1] @ queries.T
            truth = [set(members[np.argsort(-exact[:, q])[:10]].tolist()) for q in range(len(queries))]
            sql_ms, index_ms, found = [], [], []
            for query in queries:
                tick = time.perf_counter()
                cohort = cohort_image_ids(store, index, Filters(modality=wanted))
                sql_ms.append((time.perf_counter() - tick) * 1e3)
                tick = time.perf_counter()
                hits = _service_search(index, query, cohort, set(members.tolist()))
                index_ms.append((time.perf_counter() - tick) * 1e3)
                found.append(hits)
            path = ("post-filter" if cohort is None else "exact-among" if len(cohort) <= EXACT_COHORT_MAX
                    else "hnsw-selector")
            total = np.array(sql_ms) + np.array(index_ms)
            row = {"vectors": size, "selectivity": selectivity, "index": IndexSpec.hnsw().name, "path": path,
                   "p50_ms": round(float(np.percentile(total, 50)), 3), "p99_ms": round(float(np.percentile(total, 99)), 3),
                   "index_p50_ms": round(float(np.percentile(index_ms, 50)), 3),
                   "index_p99_ms": round(float(np.percentile(index_ms, 99)), 3),
                   "sql_p50_ms": round(float(np.percentile(sql_ms, 50)), 3),
                   "sql_p99_ms": round(float(np.percentile(sql_ms, 99)), 3),
                   "recall_at_10": round(float(np.mean([len(set(f) & t) / 10 for f, t in zip(found, truth, strict=True)])), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        store.close()
    return {"benchmark": "search-filtered", "date": dt.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "faiss": faiss.__version__,
            "dim": DIM, "queries": queries_count, "build_s": round(build_s, 1), "rows": rows}


def _service_search(index: SpaceIndex, query: np.ndarray, cohort: np.ndarray | None, members: set[int]) -> list[int]:
    """What :func:`retrieval.query.search.search_vector` does with the index for k = 10 (overfetch 4)."""
    fetch = 40
    while True:
        hits = index.search(query, fetch, among=cohort)[0]
        passing = [image_id for image_id, _ in hits if image_id in members]
        if len(passing) >= 10 or fetch >= index.count:
            return passing[:10]
        fetch = min(index.count, fetch * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--ef", default="32,64,128,256", help="HNSW efSearch values to sweep")
    parser.add_argument("--types", default="flat,hnsw,ivfpq", help="index types to build (flat, hnsw, ivfpq)")
    parser.add_argument("--filtered", type=int, default=0, metavar="N",
                        help="instead: filtered searches at 50/10/1/0.1 %% selectivity on N vectors (e.g. 1000000)")
    parser.add_argument("--dim", type=int, default=DIM, help="values per vector: 84 (spp:1,2,4) or 512 (biomedclip)")
    parser.add_argument("--memory-gb", type=float, default=20.0, help="skip an index whose memory would exceed this")
    parser.add_argument("--ivfpq-forms", default="", help=f"IVF-PQ forms to compare ({', '.join(IVFPQ_FORMS)}); "
                        "default: the one the service chooses")
    parser.add_argument("--name", default="search", help="result file: bench/results/<name>-<date>.json")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    forms = [form for form in args.ivfpq_forms.split(",") if form]
    if unknown := sorted(set(args.types.split(",")) - {"flat", "hnsw", "ivfpq"}):
        parser.error(f"--types: unknown index type {', '.join(unknown)} (flat, hnsw, ivfpq)")
    if unknown := sorted(set(forms) - set(IVFPQ_FORMS)):
        parser.error(f"--ivfpq-forms: unknown form {', '.join(unknown)} ({', '.join(IVFPQ_FORMS)})")
    if args.filtered:
        result = run_filtered(args.filtered, args.queries, Path(args.out))
        print("\n| vectors | selectivity | path | p50 ms | p99 ms | index p50 / p99 ms | SQL p50 / p99 ms | recall@10 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in result["rows"]:
            print(f"| {row['vectors']:,} | {row['selectivity']:.1%} | {row['path']} | {row['p50_ms']} | {row['p99_ms']} "
                  f"| {row['index_p50_ms']} / {row['index_p99_ms']} | {row['sql_p50_ms']} / {row['sql_p99_ms']} "
                  f"| {row['recall_at_10']} |")
        print(f"\nwrote {write_result(args.out, 'search-filtered', result)}")
        return
    result = run([int(s) for s in args.sizes.split(",")], args.queries, [int(e) for e in args.ef.split(",")],
                 Path(args.out), kinds=tuple(args.types.split(",")), dim=args.dim, memory_gb=args.memory_gb,
                 ivfpq_forms=forms)
    print("\n| vectors | index | efSearch / nprobe, rescore | build s | MB | p50 ms | p99 ms | QPS | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in result["rows"]:
        if "skipped" in row:
            print(f"| {row['vectors']:,} | {row['index']} | not built: {row['skipped']} | | | | | | |")
            continue
        setting = f"{row['nprobe']}, {row['rescore']}" if "nprobe" in row else row["ef_search"] or "-"
        print(f"| {row['vectors']:,} | {row['index']} | {setting} | {row['build_s']} | {row['index_mb']} "
              f"| {row['p50_ms']} | {row['p99_ms']} | {row['qps_batch1']} | {row['recall_at_10']} |")
    print(f"\nwrote {write_result(args.out, args.name, result)}")


if __name__ == "__main__":
    main()
