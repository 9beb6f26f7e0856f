"""The FAISS index of one embedding space: a derived cache of the database's vectors.

Contract (design decision 1):

* ids are image ids (``IndexIDMap2``); vectors are L2-normalised, so inner product = cosine.
* Persisted as ``<space key>.faiss`` plus a sidecar ``<space key>.json`` (space, dim, index type,
  count, watermark = highest vector row id included, highest image id). Both are written to a
  temp file and ``os.replace``d, index first. An IVF-PQ index keeps its inverted lists in a third
  file, ``<space key>.<writer>.ivfdata``, mapped read-only (:mod:`retrieval.storage.mapped_ivf`,
  decision 33); the sidecar names it.
* Several processes share the files (API server, CLI ingest, workers): saves take an exclusive
  ``flock`` on ``<space key>.lock`` and loads a shared one, so a reader never pairs one writer's
  index file with another writer's sidecar. Writers add what the database committed
  (:meth:`SpaceIndex.catch_up`), never only their own rows, so every saved file is a prefix of the
  database by row id (vector row ids grow in commit order, see ``Store.write_batch``).
* :meth:`SpaceIndex.open` never returns an index that disagrees with the database: it checks the
  sidecar against the space and the file, adds rows above the watermark (catch-up), and rebuilds
  from the database when anything does not add up (count mismatch, other space, unreadable file).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval.storage.index_spec import IndexSpec, training_step
from retrieval.storage.mapped_ivf import DATA_SUFFIX, MappedIVF
from retrieval.storage.orm import Space
from retrieval.storage.store import Store, StoredVector

logger = logging.getLogger(__name__)



def _marked(members: np.ndarray, ids: np.ndarray, top: int) -> np.ndarray:
    """``members`` grown to hold id ``top``, with ``ids`` set."""
    if len(members) <= top:
        members = np.concatenate([members, np.zeros(top + 1 - len(members) + (top + 1) // 4, dtype=bool)])
    members[ids] = True
    return members


MERGE_MIN_SHARE = 0.001
"""A mapped IVF-PQ index is rewritten by a save only once the rows it holds in RAM reach this share of it: a save
rewrites the whole lists file (2.9 GB at 100M vectors of 84 values), and ingest saves every 30 s. At 100M that is
a rewrite per 100,000 new vectors, and at most 100,000 rows for an opening process to catch up from the database."""

EXACT_COHORT_MAX = 20_000
"""A filtered cohort of at most this many images is searched exactly (gathered, one matrix product: ~3 ms for
10,000 vectors on one core, recall 1.0); a larger one through FAISS's ID selector (bench/search.py --filtered)."""


@dataclass
class Sidecar:
    space_key: str
    dim: int
    index_type: str
    count: int
    watermark: int  # highest vector row id included
    max_image_id: int
    faiss_version: str
    written_at: float
    data_file: str = ""  # IVF-PQ: the mapped inverted lists' file, beside this one

    @classmethod
    def read(cls, path: Path) -> Sidecar | None:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


@dataclass
class OpenReport:
    """What :meth:`SpaceIndex.open` had to do: ``loaded``, ``caught_up`` N rows, or ``rebuilt``."""

    action: str
    added: int = 0
    reason: str = ""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def file_lock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory ``flock`` on ``path`` (created when missing), released on exit."""
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class SpaceIndex:
    """FAISS index + sidecar for one space. Thread-safe: adds and searches hold one lock."""

    def __init__(self, *, space: Space, directory: Path, spec: IndexSpec | None = None) -> None:
        self.space = space
        self.directory = directory
        self.spec = spec or IndexSpec.flat()
        self.index = self._empty()
        self.watermark = 0
        self.max_image_id = 0
        self._members: np.ndarray | None = None  # bool by image id, built on first `holds`
        self._lock = threading.RLock()
        self._store: Store | None = None  # where a lossy index (IVF-PQ) reads exact vectors: set by open / rebuild

    # -- paths

    @property
    def index_path(self) -> Path:
        return self.directory / f"{self.space.key}.faiss"

    @property
    def sidecar_path(self) -> Path:
        return self.directory / f"{self.space.key}.json"

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.space.key}.lock"

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def _empty(self) -> faiss.Index | MappedIVF:
        index = self.spec.empty(self.space.dim)
        return MappedIVF(index) if self.spec.kind == "ivfpq" else index

    # -- lifecycle

    @classmethod
    def open(
        cls, *, store: Store, space: Space, directory: Path, spec: IndexSpec | None = None
    ) -> tuple[SpaceIndex, OpenReport]:
        """Load, catch up or rebuild so that the index equals the database's vectors of ``space``.

        An index of another type than ``spec`` on disk is rebuilt as ``spec``.
        """
        directory.mkdir(parents=True, exist_ok=True)
        index = cls(space=space, directory=directory, spec=spec)
        index._store = store
        reason = index._try_load()
        db_count, db_top = store.vector_stats(space.id)
        if reason:
            report = OpenReport("rebuilt", reason=reason)
            index.rebuild(store)
            report.added = index.count
            return index, report
        added = index.catch_up(store) if db_top > index.watermark else 0
        if index.count != db_count:
            report = OpenReport("rebuilt", reason=f"index holds {index.count} vectors, database {db_count}")
            index.rebuild(store)
            report.added = index.count
            return index, report
        if added:
            index.save()
            return index, OpenReport("caught_up", added=added)
        return index, OpenReport("loaded")

    def _try_load(self) -> str:
        """Load from disk; returns why a rebuild is needed, or "" when loaded consistently."""
        with file_lock(self.lock_path, exclusive=False):
            return self._load_files()

    def _load_files(self) -> str:
        self._remove_abandoned_saves()
        sidecar = Sidecar.read(self.sidecar_path)
        if sidecar is None or not self.index_path.exists():
            return "no index on disk"
        if sidecar.space_key != self.space.key or sidecar.dim != self.space.dim:
            return "sidecar belongs to another space"
        if sidecar.index_type != self.spec.name:
            return f"index type {sidecar.index_type} differs from {self.spec.name}"
        try:
            loaded = MappedIVF.load(self.index_path) if self.spec.kind == "ivfpq" else faiss.read_index(str(self.index_path))
        except (RuntimeError, OSError) as exc:
            return f"unreadable index file ({exc})"
        if isinstance(loaded, MappedIVF) and loaded.data_path is not None and loaded.data_path.name != sidecar.data_file:
            return f"index file maps {loaded.data_path.name}, sidecar names {sidecar.data_file or 'none'}"
        if loaded.ntotal != sidecar.count or loaded.d != self.space.dim:
            return f"index file holds {loaded.ntotal} vectors, sidecar says {sidecar.count}"
        self.index = loaded
        self.watermark = sidecar.watermark
        self.max_image_id = sidecar.max_image_id
        self._members = None
        return ""

    def _remove_abandoned_saves(self) -> None:
        """Delete the pending files of saves whose process is gone (killed between writing and renaming), and the
        IVF-PQ data files the sidecar no longer names. Called holding the lock file: no save of a data file is
        under way meanwhile (such saves hold it exclusively throughout), and a process still mapping a deleted
        data file keeps reading it (the kernel frees it when the last mapping goes)."""
        for pending in self.directory.glob(f"{self.index_path.name}.*.tmp"):
            owner = pending.name.removeprefix(f"{self.index_path.name}.").split("-", 1)[0]
            if owner.isdigit() and not _process_alive(int(owner)):
                pending.unlink(missing_ok=True)
        sidecar = Sidecar.read(self.sidecar_path)
        named = sidecar.data_file if sidecar is not None else ""
        for data_file in self.directory.glob(f"{self.space.key}.*{DATA_SUFFIX}"):
            if data_file.name != named:
                data_file.unlink(missing_ok=True)

    def rebuild(self, store: Store) -> None:
        """Build afresh from every stored vector of the space (an IVF-PQ index trained first on an even sample
        of them), then save."""
        self._store = store
        fresh = SpaceIndex(space=self.space, directory=self.directory, spec=self.spec)
        if not fresh.index.is_trained:  # IVF-PQ: its quantisers, on the GPU where faiss-gpu sees one
            fresh.index.train(_training_sample(store, self.space))
        for chunk in store.vectors_after(self.space.id, 0):
            fresh.add(chunk)
        with self._lock:
            self.index, self.watermark, self.max_image_id = fresh.index, fresh.watermark, fresh.max_image_id
            self._members = None
        self.save(force=True)

    def catch_up(self, store: Store) -> int:
        """Add every vector the database committed above the watermark; returns how many.

        Holds the index lock throughout, so concurrent callers never add a row twice.
        """
        added = 0
        with self._lock:
            for chunk in store.vectors_after(self.space.id, self.watermark):
                self.add(chunk)
                added += len(chunk)
        return added

    def add(self, vectors: list[StoredVector]) -> None:
        """Add stored vectors (ids = image ids) and advance the watermark."""
        if not vectors:
            return
        matrix = np.stack([v.vector for v in vectors]).astype(np.float32, copy=False)
        ids = np.array([v.image_id for v in vectors], dtype=np.int64)
        with self._lock:
            self.index.add_with_ids(matrix, ids)
            self.watermark = max(self.watermark, max(v.row_id for v in vectors))
            self.max_image_id = max(self.max_image_id, int(ids.max()))
            if self._members is not None:
                self._members = _marked(self._members, ids, self.max_image_id)

    def holds(self, image_ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``image_ids`` have a vector in this index (a bitmap by image id, O(len))."""
        ids = np.asarray(image_ids, dtype=np.int64)
        with self._lock:
            if self._members is None:
                self._members = _marked(np.zeros(0, dtype=bool), self._index_ids(), self.max_image_id)
            members = self._members
        inside = (ids >= 0) & (ids < len(members))
        mask = np.zeros(len(ids), dtype=bool)
        mask[inside] = members[ids[inside]]
        return mask

    def vectors(self, image_ids: np.ndarray) -> np.ndarray:
        """The exact vectors of ``image_ids`` (in that order): from the index, or, for a lossy one, from the store.
        Raises ``RuntimeError`` when an id has none."""
        ids = np.ascontiguousarray(image_ids, dtype=np.int64)
        if not self.spec.lossy:
            with self._lock:
                return self.index.reconstruct_batch(ids)
        if self._store is None:
            raise RuntimeError("a lossy index reads exact vectors from its store: open or rebuild it with one")
        try:
            return self._store.vectors_of(self.space.id, ids.tolist())
        except KeyError as exc:
            raise RuntimeError(f"image {exc} has no vector in this space") from None

    def _index_ids(self) -> np.ndarray:
        if isinstance(self.index, MappedIVF):
            return self.index.ids()
        return faiss.vector_to_array(self.index.id_map).astype(np.int64) if self.count else np.zeros(0, np.int64)

    def save(self, *, force: bool = False) -> None:
        """Persist atomically: index file, then sidecar.

        Unless ``force`` (a rebuild), a save never replaces files holding a longer prefix of the
        database (higher watermark) written meanwhile by another process. The index is streamed to a
        file of this process's own, never copied in memory first: a 6 GB HNSW index (10M vectors)
        would otherwise need twice that while it is saved.
        """
        if isinstance(self.index, MappedIVF):
            self._save_mapped(force=force)
            return
        pending = self._pending_path()
        try:
            with self._lock:
                faiss.write_index(self.index, str(pending))
                sidecar = self._sidecar()
            _fsync(pending)
            with file_lock(self.lock_path, exclusive=True):
                self._publish(pending, sidecar, force=force)
        finally:
            pending.unlink(missing_ok=True)

    def _save_mapped(self, *, force: bool) -> None:
        """An IVF-PQ save: base and delta merged into a new data file, the structure naming it, the sidecar; then
        the merged index (delta empty) is the one searched. Unless ``force``, nothing is written while the rows held
        in RAM are fewer than :data:`MERGE_MIN_SHARE` of the index (none, say), or when another process saved a
        longer prefix: the files stay a prefix of the database, and whoever opens them catches the rest up. The
        lock file is held exclusively throughout, so data files of unfinished saves never meet a cleanup."""
        with self._lock, file_lock(self.lock_path, exclusive=True):
            index = self.index
            assert isinstance(index, MappedIVF)
            if not force and (index.data_path is not None and index.delta_count < MERGE_MIN_SHARE * index.ntotal
                              or self._newer_on_disk(self.watermark)):
                return
            data = self.directory / f"{self.space.key}.{os.getpid()}-{threading.get_ident()}-{time.time_ns()}{DATA_SUFFIX}"
            pending = self._pending_path()
            try:
                merged = index.merged_into(data)
                merged.write_structure(pending)
                _fsync(data)
                _fsync(pending)
                self._publish(pending, self._sidecar(data_file=data.name), force=True)
                self.index = merged
            finally:
                pending.unlink(missing_ok=True)
                self._remove_abandoned_saves()  # the data files this save replaced (or its own, had it failed)

    def _pending_path(self) -> Path:
        return self.index_path.with_name(f"{self.index_path.name}.{os.getpid()}-{threading.get_ident()}.tmp")

    def _sidecar(self, *, data_file: str = "") -> Sidecar:
        return Sidecar(
            space_key=self.space.key,
            dim=self.space.dim,
            index_type=self.spec.name,
            count=self.count,
            watermark=self.watermark,
            max_image_id=self.max_image_id,
            faiss_version=faiss.__version__,
            written_at=time.time(),
            data_file=data_file,
        )

    def _newer_on_disk(self, watermark: int) -> bool:
        """True when the files on disk hold a longer prefix of the database than ``watermark`` (call holding the
        lock file)."""
        on_disk = Sidecar.read(self.sidecar_path)
        return on_disk is not None and on_disk.space_key == self.space.key and on_disk.watermark > watermark

    def _publish(self, pending: Path, sidecar: Sidecar, *, force: bool) -> None:
        """Rename the written index file into place and write its sidecar, unless (without ``force``) another process
        saved a longer prefix meanwhile. Call holding the lock file exclusively."""
        if not force and self._newer_on_disk(sidecar.watermark):
            return  # another process saved a newer prefix of the database; keep it
        os.replace(pending, self.index_path)
        _atomic_write_bytes(self.sidecar_path, json.dumps(asdict(sidecar), indent=2).encode())

    # -- queries

    def search(
        self, queries: np.ndarray, k: int, *, ef_search: int | None = None, among: np.ndarray | None = None
    ) -> list[list[tuple[int, float]]]:
        """Top-``k`` ``(image_id, score)`` per query row, FAISS's ``-1`` padding dropped.

        ``ef_search`` (HNSW only) trades speed for recall for this call alone; ``among`` (image ids)
        restricts the search to those images (a FAISS ID selector: a filtered cohort).
        """
        if queries.ndim == 1:
            queries = queries[None, :]
        k = max(1, min(k, max(self.count, 1)))
        if among is not None and len(among) <= EXACT_COHORT_MAX:
            exact = self._search_exact_among(queries, k, among)
            if exact is not None:
                return exact
        params = self.spec.search_params(k, ef_search)
        if among is not None:
            params = params or faiss.SearchParameters()
            params.sel = faiss.IDSelectorBatch(np.ascontiguousarray(among, dtype=np.int64))
        fetch = min(max(k, self.spec.rescore), self.count) if self.spec.lossy else k
        with self._lock:
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), fetch, params=params)
        hits = [
            [(int(i), float(s)) for i, s in zip(id_row, score_row, strict=True) if i != -1]
            for id_row, score_row in zip(ids, scores, strict=True)
        ]
        return [self._rescored(query, row, k) for query, row in zip(queries, hits, strict=True)] if self.spec.lossy else hits

    def _rescored(self, query: np.ndarray, hits: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
        """A lossy index's candidates re-scored with their exact stored vectors; the best ``k``."""
        if not hits:
            return []
        ids = np.array([image_id for image_id, _ in hits], dtype=np.int64)
        return _exact_top(query[None], k, ids, self.vectors(ids))[0]

    def _search_exact_among(
        self, queries: np.ndarray, k: int, among: np.ndarray
    ) -> list[list[tuple[int, float]]] | None:
        """Exact top-``k`` among a small cohort: its vectors gathered from the index, one matrix product.

        None when an id is not in the index (a caller that has not caught up): the selector path
        then answers, skipping it.
        """
        ids = np.ascontiguousarray(among, dtype=np.int64)
        if len(ids) == 0:
            return [[] for _ in queries]
        try:
            vectors = self.vectors(ids)
        except RuntimeError:
            return None
        return _exact_top(queries, k, ids, vectors)


def _exact_top(queries: np.ndarray, k: int, ids: np.ndarray, vectors: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per query row, the ``k`` best of ``ids`` by exact inner product with their ``vectors``, best first."""
    scores = np.ascontiguousarray(queries, dtype=np.float32) @ vectors.T
    top = min(k, len(ids))
    results = []
    for row in scores:
        best = np.argpartition(-row, top - 1)[:top] if top < len(ids) else np.arange(len(ids))
        best = best[np.argsort(-row[best], kind="stable")]
        results.append([(int(ids[i]), float(row[i])) for i in best])
    return results


def _training_sample(store: Store, space: Space) -> np.ndarray:
    """An even sample of the space's stored vectors (every ``training_step``-th, streamed)."""
    step = training_step(store.vector_stats(space.id)[0])
    rows = [row.vector for chunk in store.vectors_after(space.id) for row in chunk[::step]]
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)
