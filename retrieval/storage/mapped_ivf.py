"""An IVF-PQ index whose inverted lists are a file mapped into memory, plus the vectors added since in RAM.

At 100M vectors an IVF-PQ space's lists (ids and codes) are 2.9 GB at 84 values and 13.6 GB at 512.
Mapped read-only from a file, they live once in the host's page cache, shared by every process that
serves the space (API workers, CLI jobs), instead of once in each process's private memory; the
kernel drops cold lists under memory pressure and reads them back on demand. What each process
keeps privately is the trained structure (OPQ rotation, list centroids, PQ codebooks: a few MB) and
the vectors added since the file was written.

Files, for a space key ``K`` (design decision 33):

* ``K.faiss``: the trained structure and each list's size and offset (FAISS's ``ilod`` form of
  :class:`faiss.OnDiskInvertedLists`), naming its data file, which is looked for beside it;
* ``K.<owner>.ivfdata``: the lists' codes and ids, written once and never changed (``<owner>`` is the
  writing process and thread, so concurrent writers never share a file).

FAISS maps such a file read-only, so the vectors a process adds after loading go to an in-RAM
*delta* (the same trained quantisers, lists in RAM); a search asks both and keeps the best. A save
writes base and delta together into a new data file (:meth:`faiss.OnDiskInvertedLists.merge_from_multiple`)
and a structure file naming it (:meth:`MappedIVF.merged_into`); the caller publishes them and then
continues with the merged index, whose delta is empty.

Ids are the image ids, held by the inverted lists themselves (no ``IndexIDMap2``, whose two id maps
would cost more RAM per vector than the 21-byte codes).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from retrieval.storage import faiss_gpu

DATA_SUFFIX = ".ivfdata"


class MappedIVF:
    """A trained (or untrained, before :meth:`train`) IVF index: ``base`` lists mapped from a file (or empty in
    RAM before the first save) and ``delta`` lists in RAM. Not thread-safe: :class:`SpaceIndex` holds its lock."""

    def __init__(self, base: faiss.Index, data_path: Path | None = None) -> None:
        self.base = base
        self.data_path = data_path  # None while the base lists are in RAM (empty, never written)
        self.delta = _empty_copy(base)

    # -- the surface SpaceIndex uses, as a faiss.Index's

    @property
    def d(self) -> int:
        return int(self.base.d)

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal + self.delta.ntotal)

    @property
    def delta_count(self) -> int:
        """Vectors added since the data file was written (held in RAM until the next save)."""
        return int(self.delta.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.base.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Train the quantisers on ``sample`` (on the GPU where faiss-gpu sees one); only before any vector is added."""
        faiss_gpu.train(self.base, sample)
        self.delta = _empty_copy(self.base)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.delta.add_with_ids(vectors, ids)

    def search(
        self, queries: np.ndarray, k: int, *, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (scores, ids) over base and delta together: each searched with ``params``, the best ``k`` kept."""
        parts = [part for part in (self.base, self.delta) if part.ntotal] or [self.base]
        if len(parts) == 1:
            return parts[0].search(queries, k, params=params)
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)  # inner product: larger is better
        for part in parts:
            scores, ids = part.search(queries, k, params=params)
            heap.add_result(scores, ids)
        heap.finalize()
        return heap.D, heap.I

    def ids(self) -> np.ndarray:
        """Every id held, base and delta (read list by list from the mapped file: 8 bytes per vector)."""
        found = [np.zeros(0, dtype=np.int64)]
        for part in (self.base, self.delta):
            lists = faiss.extract_index_ivf(part).invlists
            for list_no in range(lists.nlist):
                size = lists.list_size(list_no)
                if size:
                    found.append(faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy())
        return np.concatenate(found)

    # -- files

    @classmethod
    def load(cls, structure: Path) -> MappedIVF:
        """Map the data file named by ``structure`` (looked for beside it). Raises ``RuntimeError`` when either
        file is unreadable, or the data file is shorter than the structure says (mapping it would fault)."""
        base = faiss.read_index(str(structure), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(base).invlists)
        if not isinstance(lists, faiss.OnDiskInvertedLists):
            raise RuntimeError(f"{structure.name} holds its lists inline, not in a mapped data file")
        data_path = structure.parent / Path(lists.filename).name
        size = data_path.stat().st_size if data_path.exists() else -1
        if size < lists.totsize:
            raise RuntimeError(f"data file {data_path.name} holds {size} bytes, {structure.name} needs {lists.totsize}")
        lists.filename = str(data_path)
        _serve_only(lists)
        if lists.totsize:
            lists.do_mmap()
        return cls(base, data_path)

    def merged_into(self, data_path: Path) -> MappedIVF:
        """Base and delta written together into the new file ``data_path`` (read-only from then on; not yet
        fsynced), as a MappedIVF on it with an empty delta. Write its structure with :meth:`write_structure`."""
        ivf = faiss.extract_index_ivf(self.base)
        merged_lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
        sources = faiss.InvertedListsPtrVector()
        for part in (self.base, self.delta):
            sources.push_back(faiss.extract_index_ivf(part).invlists)
        with _c_stdout_to_stderr():  # FAISS prints "resizing <file> to N bytes" on stdout, where --json goes
            total = merged_lists.merge_from_multiple(sources.data(), sources.size(), False, False)
        _serve_only(merged_lists)
        merged = _empty_copy(self.base)
        _set_lists(merged, merged_lists, total)
        return MappedIVF(merged, data_path)

    def write_structure(self, path: Path) -> None:
        """Write the trained structure and the lists' layout to ``path``, naming the data file by its name only
        (it is found beside the structure, wherever the directory is copied to)."""
        if self.data_path is None or self.delta.ntotal:
            raise RuntimeError("only a merged index (all lists in its data file) has a structure to write")
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(self.base).invlists)
        full_name = lists.filename
        lists.filename = self.data_path.name
        try:
            faiss.write_index(self.base, str(path))
        finally:
            lists.filename = full_name


def _empty_copy(index: faiss.Index) -> faiss.Index:
    """The same trained structure with empty lists in RAM. Mapped lists serialise as their layout alone and are
    read back without mapping; lists in RAM are copied, so an index holding some is emptied first (a clone)."""
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    mapped = isinstance(lists, faiss.OnDiskInvertedLists)
    if not mapped and index.ntotal:
        index = faiss.clone_index(index)
        index.reset()
    copy = faiss.deserialize_index(faiss.serialize_index(index), faiss.IO_FLAG_SKIP_IVF_DATA if mapped else 0)
    ivf = faiss.extract_index_ivf(copy)
    _set_lists(copy, faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size), 0)
    return copy


def _serve_only(lists: faiss.OnDiskInvertedLists) -> None:
    """Mapped lists as a server reads them: read-only, and without FAISS's prefetch, which starts up to 32 threads
    per query to touch the pages of the lists it will visit (at 200k vectors, nprobe 64, one query took 1.54 ms with
    it and 0.30 ms without; lists in RAM 0.32 ms; 2-core EPYC, 2026-11-30). A page not in the page cache is read
    on first touch instead."""
    lists.read_only = True
    lists.prefetch_nthread = 0


def _set_lists(index: faiss.Index, lists: faiss.InvertedLists, total: int) -> None:
    """Give ``index``'s IVF ``lists`` (owned from now on by FAISS) holding ``total`` vectors."""
    ivf = faiss.extract_index_ivf(index)
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.ntotal = total
    index.ntotal = total


@contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Send what is written to file descriptor 1 meanwhile to descriptor 2 (C's buffers flushed before and after
    the switch): stdout stays the command's output alone; nothing is lost, another thread's output included."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
