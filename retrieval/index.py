"""The FAISS index of one embedding space: a derived cache of the database's vectors.

Contract (design decision 1):

* ids are image ids (``IndexIDMap2``); vectors are L2-normalised, so inner product = cosine.
* Persisted as ``<space key>.faiss`` plus a sidecar ``<space key>.json`` (space, dim, index type,
  count, watermark = highest vector row id included, highest image id). Both are written to a
  temp file and ``os.replace``d, index first.
* :meth:`SpaceIndex.open` never returns an index that disagrees with the database: it checks the
  sidecar against the space and the file, adds rows above the watermark (catch-up), and rebuilds
  from the database when anything does not add up (count mismatch, other space, unreadable file).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval.models import Space
from retrieval.store import Store, StoredVector

logger = logging.getLogger(__name__)

INDEX_TYPE_FLAT = "flat-ip"


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


class SpaceIndex:
    """FAISS index + sidecar for one space. Thread-safe: adds and searches hold one lock."""

    def __init__(self, *, space: Space, directory: Path) -> None:
        self.space = space
        self.directory = directory
        self.index = self._empty()
        self.watermark = 0
        self.max_image_id = 0
        self._lock = threading.RLock()

    # -- paths

    @property
    def index_path(self) -> Path:
        return self.directory / f"{self.space.key}.faiss"

    @property
    def sidecar_path(self) -> Path:
        return self.directory / f"{self.space.key}.json"

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def _empty(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.space.dim))

    # -- lifecycle

    @classmethod
    def open(cls, *, store: Store, space: Space, directory: Path) -> tuple[SpaceIndex, OpenReport]:
        """Load, catch up or rebuild so that the index equals the database's vectors of ``space``."""
        directory.mkdir(parents=True, exist_ok=True)
        index = cls(space=space, directory=directory)
        reason = index._try_load()
        db_count, db_top = store.vector_stats(space.id)
        if reason:
            report = OpenReport("rebuilt", reason=reason)
            index.rebuild(store)
            report.added = index.count
            return index, report
        added = 0
        if db_top > index.watermark:
            for chunk in store.vectors_after(space.id, index.watermark):
                index.add(chunk)
                added += len(chunk)
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
        sidecar = Sidecar.read(self.sidecar_path)
        if sidecar is None or not self.index_path.exists():
            return "no index on disk"
        if sidecar.space_key != self.space.key or sidecar.dim != self.space.dim:
            return "sidecar belongs to another space"
        if sidecar.index_type != INDEX_TYPE_FLAT:
            return f"index type {sidecar.index_type} differs from {INDEX_TYPE_FLAT}"
        try:
            loaded = faiss.read_index(str(self.index_path))
        except RuntimeError as exc:
            return f"unreadable index file ({exc})"
        if loaded.ntotal != sidecar.count or loaded.d != self.space.dim:
            return f"index file holds {loaded.ntotal} vectors, sidecar says {sidecar.count}"
        self.index = loaded
        self.watermark = sidecar.watermark
        self.max_image_id = sidecar.max_image_id
        return ""

    def rebuild(self, store: Store) -> None:
        """Build afresh from every stored vector of the space, then save."""
        fresh = SpaceIndex(space=self.space, directory=self.directory)
        for chunk in store.vectors_after(self.space.id, 0):
            fresh.add(chunk)
        with self._lock:
            self.index, self.watermark, self.max_image_id = fresh.index, fresh.watermark, fresh.max_image_id
        self.save()

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

    def save(self) -> None:
        """Persist atomically: index file, then sidecar."""
        with self._lock:
            data = faiss.serialize_index(self.index).tobytes()
            sidecar = Sidecar(
                space_key=self.space.key,
                dim=self.space.dim,
                index_type=INDEX_TYPE_FLAT,
                count=self.count,
                watermark=self.watermark,
                max_image_id=self.max_image_id,
                faiss_version=faiss.__version__,
                written_at=time.time(),
            )
        _atomic_write_bytes(self.index_path, data)
        _atomic_write_bytes(self.sidecar_path, json.dumps(asdict(sidecar), indent=2).encode())

    # -- queries

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Top-``k`` ``(image_id, score)`` per query row, FAISS's ``-1`` padding dropped."""
        if queries.ndim == 1:
            queries = queries[None, :]
        k = max(1, min(k, max(self.count, 1)))
        with self._lock:
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [
            [(int(i), float(s)) for i, s in zip(id_row, score_row, strict=True) if i != -1]
            for id_row, score_row in zip(ids, scores, strict=True)
        ]
