from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_settings

from retrieval.domain.metadata import ImageMetadata
from retrieval.domain.spaces import SpaceIdentity
from retrieval.storage.index import SpaceIndex
from retrieval.storage.rows import NewImage
from retrieval.storage.store import Store

DIM = 16


def _store_with_vectors(tmp_path: Path, n: int, *, seed: int = 0) -> tuple[Store, object, np.ndarray]:
    store = Store.open(tiny_settings(tmp_path / "data"))
    space = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "spp:1", DIM))
    vectors = _unit(np.random.default_rng(seed).normal(size=(n, DIM)))
    _add(store, space, vectors, start=0)
    return store, space, vectors


def _clustered_store(
    tmp_path: Path, *, clusters: int, spread: float, seed: int
) -> tuple[Store, object, np.ndarray, np.ndarray, np.random.Generator]:
    """3000 stored vectors in ``clusters`` groups of near neighbours, as archives are (IVF-PQ's tests): the store,
    its space, the vectors, the cluster centres and the generator (for queries near them)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    vectors = _unit(centres[rng.integers(0, clusters, 3000)] + spread * rng.normal(size=(3000, DIM)))
    store = Store.open(tiny_settings(tmp_path / "data"))
    space = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "spp:1", DIM))
    _add(store, space, vectors, start=0)
    return store, space, vectors, centres, rng


def _unit(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def _add(store: Store, space: object, vectors: np.ndarray, *, start: int) -> list:
    rows = [
        NewImage(
            source_uri=f"/x/{start + i}.png", sha256=f"{start + i:064d}", study_key=f"folder:/x/{(start + i) % 5}",
            study_label=str((start + i) % 5), kind="raster", width=8, height=8, frames=1, metadata=ImageMetadata(),
            z=np.zeros((4, 2, 2), np.float32), vector=v,
        )
        for i, v in enumerate(vectors)
    ]
    return store.write_batch(space=space, images=rows)


def test_flat_index_equals_exact_search(tmp_path: Path) -> None:
    store, space, vectors = _store_with_vectors(tmp_path, 300)
    index, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index")
    assert report.action == "rebuilt" and index.count == 300
    queries = _unit(np.random.default_rng(1).normal(size=(5, DIM)))
    ids_by_row = {i: i + 1 for i in range(300)}  # image ids start at 1 in insertion order
    exact = queries @ vectors.T
    for q, hits in enumerate(index.search(queries, 10)):
        expected = [ids_by_row[int(i)] for i in np.argsort(-exact[q])[:10]]
        assert [image_id for image_id, _ in hits] == expected
        assert np.allclose([s for _, s in hits], np.sort(exact[q])[::-1][:10], atol=1e-5)


def test_search_drops_padding_ids(tmp_path: Path) -> None:
    store, space, _ = _store_with_vectors(tmp_path, 3)
    index, _ = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index")
    hits = index.search(np.ones(DIM, np.float32) / 4, 10)[0]
    assert len(hits) == 3 and all(image_id > 0 for image_id, _ in hits)


def test_reopen_loads_then_catches_up_rows_committed_after_save(tmp_path: Path) -> None:
    store, space, _ = _store_with_vectors(tmp_path, 20)
    directory = tmp_path / "index"
    SpaceIndex.open(store=store, space=space, directory=directory)
    assert SpaceIndex.open(store=store, space=space, directory=directory)[1].action == "loaded"
    # rows committed but never added to the saved index (a crash between commit and save)
    _add(store, space, _unit(np.random.default_rng(5).normal(size=(7, DIM))), start=20)
    index, report = SpaceIndex.open(store=store, space=space, directory=directory)
    assert report.action == "caught_up" and report.added == 7 and index.count == 27
    sidecar = json.loads((directory / f"{space.key}.json").read_text())
    assert sidecar["count"] == 27 and sidecar["watermark"] == store.vector_stats(space.id)[1]


@pytest.mark.parametrize("damage", ["sidecar_count", "other_space", "truncated_index", "missing_sidecar"])
def test_inconsistent_files_trigger_rebuild(tmp_path: Path, damage: str) -> None:
    store, space, _ = _store_with_vectors(tmp_path, 12)
    directory = tmp_path / "index"
    index, _ = SpaceIndex.open(store=store, space=space, directory=directory)
    sidecar_path, index_path = index.sidecar_path, index.index_path
    data = json.loads(sidecar_path.read_text())
    if damage == "sidecar_count":
        data["count"] = 5
        sidecar_path.write_text(json.dumps(data))
    elif damage == "other_space":
        data["space_key"] = "0" * 64
        sidecar_path.write_text(json.dumps(data))
    elif damage == "truncated_index":
        index_path.write_bytes(index_path.read_bytes()[:100])
    else:
        sidecar_path.unlink()
    reopened, report = SpaceIndex.open(store=store, space=space, directory=directory)
    assert report.action == "rebuilt" and reopened.count == 12


def test_watermark_ahead_with_fewer_rows_rebuilds(tmp_path: Path) -> None:
    """An index holding more vectors than the database (rows lost after a restore) is rebuilt."""
    store, space, _ = _store_with_vectors(tmp_path, 10)
    directory = tmp_path / "index"
    index, _ = SpaceIndex.open(store=store, space=space, directory=directory)
    from retrieval.storage.store import StoredVector

    index.add([StoredVector(row_id=5, image_id=999, vector=np.ones(DIM, np.float32) / 4)])
    index.save()
    reopened, report = SpaceIndex.open(store=store, space=space, directory=directory)
    assert report.action == "rebuilt" and reopened.count == 10
    assert 999 not in {i for i, _ in reopened.search(np.ones(DIM, np.float32) / 4, 20)[0]}


def test_hnsw_index_is_chosen_by_size_recalls_and_persists_its_type(tmp_path: Path) -> None:
    import faiss

    from retrieval.storage.index_spec import IndexSpec, choose_index_spec

    settings = tiny_settings(tmp_path / "data", hnsw_min_vectors=500)
    assert choose_index_spec(499, settings).kind == "flat" and choose_index_spec(500, settings).kind == "hnsw"
    assert choose_index_spec(10, tiny_settings(tmp_path / "d", index_type="hnsw")).kind == "hnsw"
    store, space, vectors = _store_with_vectors(tmp_path, 2000)
    spec = choose_index_spec(2000, settings)
    index, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index", spec=spec)
    assert report.action == "rebuilt" and index.count == 2000
    assert json.loads(index.sidecar_path.read_text())["index_type"] == spec.name == "hnsw-ip:m=32,efc=80"
    queries = _unit(np.random.default_rng(7).normal(size=(50, DIM)))
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10] + 1
    found = index.search(queries, 10, ef_search=256)
    recall = np.mean([len({i for i, _ in hits} & set(exact[q])) / 10 for q, hits in enumerate(found)])
    assert recall >= 0.95
    inner = faiss.downcast_index(index.index.index)
    ef_before = inner.hnsw.efSearch
    index.search(queries, 10, ef_search=16)
    assert inner.hnsw.efSearch == ef_before  # per-call parameters never mutate the shared index
    # a reopen with the same spec loads; a different type on disk is rebuilt as asked
    assert SpaceIndex.open(store=store, space=space, directory=tmp_path / "index", spec=spec)[1].action == "loaded"
    flat, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index", spec=IndexSpec.flat())
    assert report.action == "rebuilt" and "differs" in report.reason and flat.count == 2000


def test_ivfpq_is_chosen_beyond_the_memory_budget_and_rescoring_recovers_recall(tmp_path: Path) -> None:
    """Issue 19: auto picks IVF-PQ (trained on the stored vectors, params in the sidecar) once HNSW would not fit
    RETRIEVAL_INDEX_MEMORY_MB; exact re-scoring of its top candidates from the stored vectors gives exact scores."""
    from retrieval.storage.index_spec import IndexSpec, choose_index_spec

    roomy = tiny_settings(tmp_path / "a", hnsw_min_vectors=500)
    tight = tiny_settings(tmp_path / "b", hnsw_min_vectors=500, index_memory_mb=1)
    assert choose_index_spec(3000, roomy, 84).kind == "hnsw"
    assert choose_index_spec(999, tight, 84).kind == "hnsw"  # too few vectors to train quantisers
    big = choose_index_spec(3000, tight, 84)  # 3000 x (336 + 272) bytes of HNSW > 1 MiB
    assert (big.kind, big.nlist, big.pq_m) == ("ivfpq", 64, 21) and big.name == "ivfpq-ip:opq,nlist=64,pq=21x8,mapped"
    assert big.factory_string == "OPQ21,IVF64,PQ21x8"  # 21-byte codes: OPQ-rotated; few lists: flat centroids
    # 10M: lists found through an HNSW graph; 512 values (128-byte codes): no OPQ
    assert choose_index_spec(10_000_000, tight, 84).factory_string == "OPQ21,IVF16384_HNSW32,PQ21x8"
    assert choose_index_spec(10_000_000, tight, 512).name == "ivfpq-ip:nlist=16384/hnsw,pq=128x8,mapped"
    assert [IndexSpec.ivfpq(n, 84).rescore for n in (3000, 1_000_000, 4_000_000, 10_000_000)] == [256, 256, 512, 1024]
    assert IndexSpec.ivfpq(10_000_000, 84, rescore=300).rescore == 300  # RETRIEVAL_INDEX_RESCORE, when set
    assert choose_index_spec(500, tiny_settings(tmp_path / "c", index_type="ivfpq"), 84).kind == "flat"
    store, space, vectors, centres, rng = _clustered_store(tmp_path, clusters=40, spread=0.35, seed=3)
    spec = IndexSpec.ivfpq(3000, DIM, nprobe=8, rescore=100)
    index, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index", spec=spec)
    assert report.action == "rebuilt" and index.count == 3000 and index.index.is_trained
    assert json.loads(index.sidecar_path.read_text())["index_type"] == spec.name
    queries = _unit(centres[:20] + 0.35 * rng.normal(size=(20, DIM)))
    exact = queries @ vectors.T
    found = index.search(queries, 10)
    recall = np.mean([len({i for i, _ in hits} & set(np.argsort(-exact[q])[:10] + 1)) / 10 for q, hits in enumerate(found)])
    assert recall >= 0.9, recall
    for q, hits in enumerate(found):  # re-scored: the scores are the exact cosines, best first
        assert np.allclose([score for _, score in hits], exact[q][[i - 1 for i, _ in hits]], atol=1e-5)
        assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
    assert np.allclose(index.vectors(np.array([5, 17])), vectors[[4, 16]])  # exact, from the store
    cohort = index.search(queries[:1], 3, among=np.arange(1, 60))[0]
    assert [i for i, _ in cohort] == list(np.argsort(-exact[0][:59])[:3] + 1)
    # reopened: loaded, not retrained; new vectors are caught up into the trained lists
    more = _unit(centres[rng.integers(0, 40, 50)] + 0.35 * rng.normal(size=(50, DIM)))
    _add(store, space, more, start=3000)
    reopened, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index", spec=spec)
    assert report.action == "caught_up" and reopened.count == 3050
    assert reopened.search(more[:1], 1)[0][0][0] == 3001
    # the lists found through an HNSW graph (as from 8,192 lists on), searched with the graph's own parameters
    graph = replace(spec, coarse_hnsw=True, opq=False)  # the graph alone (OPQ's training is tested above)
    assert graph.factory_string == f"IVF64_HNSW32,PQ{spec.pq_m}x8"
    through_graph, _ = SpaceIndex.open(store=store, space=space, directory=tmp_path / "graph", spec=graph)
    found = through_graph.search(queries, 10)
    assert np.mean([len({i for i, _ in hits} & set(np.argsort(-exact[q])[:10] + 1)) / 10
                    for q, hits in enumerate(found)]) >= 0.9


def test_ivfpq_lists_are_mapped_read_only_from_a_file_and_new_vectors_wait_in_ram_until_a_save(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue 19: an IVF-PQ space's inverted lists are a data file mapped read-only (page cache shared by every
    process); vectors caught up after loading are searched from RAM beside it, and a save merges both into a new
    data file named by the sidecar, the replaced one deleted (a process still mapping it keeps its answers)."""
    import faiss

    from retrieval.ops.backup import _copy_index
    from retrieval.storage.index_spec import IndexSpec

    store, space, _, centres, rng = _clustered_store(tmp_path, clusters=30, spread=0.3, seed=5)
    spec = replace(IndexSpec.ivfpq(3000, DIM, nprobe=8, rescore=100), opq=False)  # OPQ's training: tested above
    directory = tmp_path / "index"
    first, report = SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)
    assert report.action == "rebuilt" and first.count == 3000

    def data_files() -> list[str]:
        return sorted(p.name for p in directory.glob("*.ivfdata"))

    [data_name] = data_files()
    assert json.loads(first.sidecar_path.read_text())["data_file"] == data_name
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(first.index.base).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only  # mapped, not copied into RAM
    assert first.index.delta_count == 0 and sorted(first._index_ids().tolist()) == list(range(1, 3001))
    queries = _unit(centres[:10] + 0.3 * rng.normal(size=(10, DIM)))
    before = first.search(queries, 10)
    second, report = SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)  # another process
    assert report.action == "loaded" and second.search(queries, 10) == before
    # new rows: searched from RAM beside the mapped lists, which stay as written
    more = _unit(centres[rng.integers(0, 30, 40)] + 0.3 * rng.normal(size=(40, DIM)))
    _add(store, space, more, start=3000)
    data_bytes = (directory / data_name).read_bytes()
    assert second.catch_up(store) == 40 and second.index.delta_count == 40 and second.count == 3040
    assert (directory / data_name).read_bytes() == data_bytes
    assert second.search(more[:1], 1)[0][0][0] == 3001
    assert second.holds(np.array([3040, 3041])).tolist() == [True, False]
    unsaved = second.search(queries, 10)
    second.save()
    [merged_name] = data_files()
    assert merged_name != data_name and json.loads(second.sidecar_path.read_text())["data_file"] == merged_name
    assert second.index.delta_count == 0 and second.search(queries, 10) == unsaved
    assert first.search(queries, 10) == before  # its mapping of the deleted file still answers
    assert "resizing" not in capfd.readouterr().out  # FAISS's chatter while writing lists stays off stdout
    reopened, report = SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)
    assert report.action == "loaded" and reopened.count == 3040 and reopened.search(queries, 10) == unsaved
    # a save merges once the rows held in RAM reach 0.1 % of the index (a whole rewrite each time): 1 of 3041 waits
    _add(store, space, more[:1], start=3040)
    assert reopened.catch_up(store) == 1 and reopened.index.delta_count == 1
    reopened.save()
    assert data_files() == [merged_name] and json.loads(reopened.sidecar_path.read_text())["count"] == 3040
    waited, report = SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)
    assert report.action == "caught_up" and waited.count == 3041  # the files stay a prefix; the opener catches up
    _copy_index(directory, tmp_path / "backup")  # `retrieval backup` takes the lists file the sidecar names
    copied, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "backup", spec=spec)
    assert (report.action, report.added, copied.count) == ("caught_up", 1, 3041)  # loaded, not rebuilt
    # a killed save's data file is deleted at the next open; a truncated data file means a rebuild
    (directory / f"{space.key}.999999999-1-1.ivfdata").write_bytes(b"half a save")
    (directory / merged_name).write_bytes((directory / merged_name).read_bytes()[:1000])
    rebuilt, report = SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)
    assert report.action == "rebuilt" and "unreadable" in report.reason
    assert len(data_files()) == 1 and rebuilt.count == 3041


def test_a_cohort_is_searched_exactly_and_membership_follows_adds(tmp_path: Path) -> None:
    """Issue 15: a small cohort is scored exactly (its vectors gathered); ``holds`` knows the index's ids."""
    store, space, vectors = _store_with_vectors(tmp_path, 200)
    index, _ = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index")
    cohort = np.arange(5, 200, 7, dtype=np.int64)  # image ids
    query = _unit(np.random.default_rng(3).normal(size=(1, DIM)))[0]
    exact = vectors[cohort - 1] @ query
    hits = index.search(query, 5, among=cohort)[0]
    assert [image_id for image_id, _ in hits] == [int(cohort[i]) for i in np.argsort(-exact)[:5]]
    assert np.allclose([score for _, score in hits], np.sort(exact)[::-1][:5], atol=1e-5)
    assert index.holds(np.array([1, 200, 201, 0, 10**9])).tolist() == [True, True, False, False, False]
    _add(store, space, _unit(np.random.default_rng(4).normal(size=(3, DIM))), start=200)
    index.catch_up(store)
    assert index.holds(np.array([201, 203, 204])).tolist() == [True, True, False]
    assert index.search(query, 3, among=np.array([203, 999], dtype=np.int64))[0][0][0] == 203  # 999: selector path


def test_bulk_knn_without_a_gpu_is_exact_search_on_the_cpu() -> None:
    """faiss_gpu.knn (the bench's ground truth; the GPU with faiss-gpu) answers what numpy's exact ranking does."""
    from retrieval.storage import faiss_gpu

    rng = np.random.default_rng(11)
    base, queries = _unit(rng.normal(size=(500, DIM))), _unit(rng.normal(size=(7, DIM)))
    assert faiss_gpu.gpu_count() == 0  # faiss-cpu: the path CI runs
    scores, rows = faiss_gpu.knn(queries, base, 5)
    exact = queries @ base.T
    assert (rows == np.argsort(-exact, axis=1)[:, :5]).all()
    assert np.allclose(scores, np.take_along_axis(exact, rows, 1), atol=1e-5)
    assert faiss_gpu.knn(queries, base[:3], 5)[1].shape == (7, 3)  # k never exceeds the base


def test_a_save_streams_to_its_own_pending_file_and_a_killed_saves_file_is_removed(tmp_path: Path) -> None:
    """A save writes the index to a file of its own process (no in-memory copy), renamed into place; the pending
    file of a save whose process died is deleted at the next open, a live process's is left alone."""
    import subprocess
    import sys

    store, space, _ = _store_with_vectors(tmp_path, 50)
    index, _ = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index")
    index.save()
    assert sorted(p.name for p in (tmp_path / "index").iterdir() if p.suffix == ".tmp") == []
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "index" / f"{index.index_path.name}.{gone.stdout.strip()}-1.tmp"
    live = tmp_path / "index" / f"{index.index_path.name}.{os.getpid()}-1.tmp"
    dead.write_bytes(b"half a save")
    live.write_bytes(b"a save in progress")
    reopened, report = SpaceIndex.open(store=store, space=space, directory=tmp_path / "index")
    assert report.action == "loaded" and reopened.count == 50
    assert not dead.exists() and live.exists()


def test_concurrent_openers_and_savers_of_a_mapped_ivfpq_index_never_see_a_broken_pair(tmp_path: Path) -> None:
    """Two writers (an API server and an ingest, say) open, catch up, search and save the same IVF-PQ space at once,
    round after round: every open finds the files loadable (never a rebuild), and one data file is left."""
    import threading

    from retrieval.storage.index_spec import IndexSpec

    store, space, _, centres, rng = _clustered_store(tmp_path, clusters=20, spread=0.3, seed=9)
    spec = replace(IndexSpec.ivfpq(3000, DIM, nprobe=8, rescore=50), opq=False)
    directory = tmp_path / "index"
    SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)
    stores = [Store.open(tiny_settings(tmp_path / "data")) for _ in range(2)]
    problems: list[str] = []

    def writer(own: Store) -> None:
        try:
            index, report = SpaceIndex.open(store=own, space=space, directory=directory, spec=spec)
            if report.action == "rebuilt":
                problems.append(report.reason)
            index.search(_unit(centres[:2]), 5)
            index.save()
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            problems.append(repr(exc))

    total = 3000
    for _ in range(6):
        _add(store, space, _unit(centres[rng.integers(0, 20, 10)] + 0.3 * rng.normal(size=(10, DIM))), start=total)
        total += 10
        threads = [threading.Thread(target=writer, args=(own,)) for own in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert problems == []
    assert len(list(directory.glob("*.ivfdata"))) == 1
    final, report = SpaceIndex.open(store=store, space=space, directory=directory, spec=spec)
    assert report.action == "loaded" and final.count == total
