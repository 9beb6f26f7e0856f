"""Which FAISS index holds a space, chosen by its size and a memory budget.

* ``flat``: exact inner product; a full scan per query (about 3 ms per 100k vectors of 84 values
  on one core here).
* ``hnsw``: a graph over the full vectors; answers 1M vectors in well under 10 ms at recall@10 >=
  0.95 (bench/search.py, docs/benchmarks.md), at about ``4 * dim + 2 * 4 * m`` bytes per vector.
* ``ivfpq``: inverted lists of product-quantised codes (``pq_m`` bytes per vector), trained on a
  sample of the space's stored vectors (OPQ-rotated for codes of up to 32 bytes; lists found through
  an HNSW graph from 8,192 lists on); a query visits ``nprobe`` lists and its ``rescore`` best
  candidates are re-scored exactly with their stored vectors, which recovers the recall the
  quantisation loses. Chosen when HNSW would not fit ``RETRIEVAL_INDEX_MEMORY_MB``. Its lists (ids and
  codes) live in a file mapped read-only, shared through the page cache by every process serving the
  space (:mod:`retrieval.storage.mapped_ivf`).

The spec's :attr:`IndexSpec.name` is recorded in the index's sidecar; an index on disk whose name
differs is rebuilt. ``nlist`` grows with the archive in powers of two (about 4 * sqrt(N)), so an
IVF-PQ index is retrained when the archive has quadrupled, not on every start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss

from retrieval.config import Settings

IVFPQ_MIN_VECTORS = 1_000
"""Below this a space is too small to train product quantisers (256 centroids per sub-vector): flat or HNSW."""
TRAIN_MAX = 100_000
"""At most this many stored vectors (an even sample of the space) train an IVF-PQ index."""
HNSW_COARSE_MIN_LISTS = 8_192
"""From this many lists on (4M+ vectors), a vector finds its lists through an HNSW graph over the list centroids
instead of comparing it with every centroid: assigning 10M vectors of 512 values to 16,384 lists is 168 TFLOP
flat, a few through the graph (FAISS's own advice for 10M-1B). At 1M vectors / 4,096 lists the graph costs
recall@10 0.006 (0.972 -> 0.966 at nprobe 64, 256 re-scored; bench/search.py --ivfpq-forms), so below this
the centroids are scanned."""
OPQ_MAX_CODES = 32
"""IVF-PQ with at most this many code bytes (vectors of up to 128 values) is rotated by OPQ first: at 1M vectors of
84 values recall@10 went from 0.972 to 0.986 (nprobe 64, 256 re-scored) for 27 s more build (64 s instead of 37),
once, at rebuild (bench/search.py --ivfpq-forms). Wider codes (512 values: 128 bytes of 4-value sub-vectors) are
left unrotated: OPQ's training grows with the code width and was not measured to pay there."""


def training_step(vector_count: int) -> int:
    """Every how many-th stored vector trains an IVF-PQ index: an even sample of at most :data:`TRAIN_MAX`."""
    return max(1, -(-vector_count // TRAIN_MAX))


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index holds a space (inner product on L2-normalised vectors) and how it is searched.

    Search parameters (``efSearch``, ``nprobe``) go with each call; the shared index object is never
    mutated to change them.
    """

    kind: str  # "flat" | "hnsw" | "ivfpq"
    m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 64
    rescore: int = 256
    opq: bool = False  # IVF-PQ: an OPQ rotation before the coarse quantiser
    coarse_hnsw: bool = False  # IVF-PQ: lists found through an HNSW graph over their centroids

    @classmethod
    def flat(cls) -> IndexSpec:
        return cls("flat")

    @classmethod
    def hnsw(cls, *, m: int = 32, ef_search: int = 128) -> IndexSpec:
        return cls("hnsw", m=m, ef_search=ef_search)

    @classmethod
    def ivfpq(cls, vector_count: int, dim: int, *, nprobe: int = 64, rescore: int = 0) -> IndexSpec:
        """IVF-PQ sized for ``vector_count`` vectors of ``dim`` values: nlist a power of two near 4 * sqrt(N)
        (at most N / 39, FAISS's minimum of training points per list), ``dim / 4`` bytes of code per vector
        (the largest divisor of dim not above it), and ``rescore`` 0 = :func:`auto_rescore`."""
        target = max(1.0, min(4 * math.sqrt(vector_count), vector_count / 39))
        nlist = 2 ** max(0, round(math.log2(target)))
        pq_m = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
        return cls("ivfpq", nlist=nlist, pq_m=pq_m, nprobe=nprobe, rescore=rescore or auto_rescore(vector_count),
                   opq=pq_m <= OPQ_MAX_CODES, coarse_hnsw=nlist >= HNSW_COARSE_MIN_LISTS)

    @property
    def lossy(self) -> bool:
        """True when the index holds approximations of the vectors (scores are re-computed from stored ones)."""
        return self.kind == "ivfpq"

    @property
    def name(self) -> str:
        """Recorded in the sidecar; a different name on disk means rebuild."""
        if self.kind == "flat":
            return "flat-ip"
        if self.kind == "hnsw":
            return f"hnsw-ip:m={self.m},efc={self.ef_construction}"
        return f"ivfpq-ip:{'opq,' if self.opq else ''}nlist={self.nlist}{'/hnsw' if self.coarse_hnsw else ''},pq={self.pq_m}x8,mapped"

    @property
    def factory_string(self) -> str:
        """IVF-PQ as FAISS's index factory spells it, e.g. ``OPQ21,IVF16384_HNSW32,PQ21x8``."""
        rotation = f"OPQ{self.pq_m}," if self.opq else ""
        return f"{rotation}IVF{self.nlist}{'_HNSW32' if self.coarse_hnsw else ''},PQ{self.pq_m}x8"

    def empty(self, dim: int) -> faiss.Index:
        """A new index: flat and HNSW inside an ``IndexIDMap2`` (ids are image ids, vectors reconstructable by id);
        IVF-PQ bare, untrained, its inverted lists holding the ids themselves."""
        if self.kind == "ivfpq":
            return faiss.index_factory(dim, self.factory_string, faiss.METRIC_INNER_PRODUCT)
        if self.kind == "flat":
            inner = faiss.IndexFlatIP(dim)
        else:
            inner = faiss.IndexHNSWFlat(dim, self.m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
        return faiss.IndexIDMap2(inner)

    def search_params(self, k: int, ef_search: int | None) -> faiss.SearchParameters | None:
        if self.kind == "flat":
            return None
        if self.kind == "ivfpq":
            params = faiss.SearchParametersIVF()
            params.nprobe = min(self.nlist, self.nprobe)
            if self.coarse_hnsw:  # the graph must return nprobe lists, and good ones
                params.quantizer_params = faiss.SearchParametersHNSW()
                params.quantizer_params.efSearch = 2 * params.nprobe
            return params
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(k, ef_search or self.ef_search)
        return params

    def bytes_per_vector(self, dim: int) -> int:
        """The index's memory per vector (ids included), for the budget; IVF-PQ's is page cache shared by the
        processes that map its lists, not each one's own."""
        if self.kind == "flat":
            return 4 * dim + 8
        if self.kind == "hnsw":
            return 4 * dim + 2 * 4 * self.m + 8 + 8  # vectors, level-0 links, the id map (both ways)
        return self.pq_m + 8  # codes and ids in the lists


def auto_rescore(vector_count: int) -> int:
    """IVF-PQ candidates re-scored per query: 256 up to 1M vectors, doubled each time the space quadruples beyond
    (1024 at 10M, 4096 at 100M). Measured (bench/search.py, 84 values): 256 gives recall@10 0.97 at 1M but 0.90
    at 10M, where 1024 gives 0.98."""
    quadruplings = max(0, math.ceil(math.log(max(vector_count, 1) / 1_000_000, 4)))
    return 256 * 2**quadruplings


def choose_index_spec(vector_count: int, settings: Settings, dim: int = 0) -> IndexSpec:
    """``index_type`` = flat | hnsw | ivfpq, or auto: exact search below ``hnsw_min_vectors``, HNSW above, and
    IVF-PQ with exact re-scoring once HNSW over ``vector_count`` vectors of ``dim`` values would not fit
    ``index_memory_mb``. IVF-PQ needs at least :data:`IVFPQ_MIN_VECTORS` to train its quantisers: a smaller
    space is searched exactly, whatever ``index_type`` says."""
    index = settings.index
    hnsw = IndexSpec.hnsw(m=index.hnsw_m, ef_search=index.hnsw_ef_search)
    ivfpq = IndexSpec.ivfpq(vector_count, dim or 1, nprobe=index.nprobe, rescore=index.rescore)
    kind = index.type
    if kind == "auto":
        kind = "hnsw" if vector_count >= index.hnsw_min_vectors else "flat"
        budget = index.memory_mb * 2**20
        chosen = hnsw if kind == "hnsw" else IndexSpec.flat()
        if vector_count >= IVFPQ_MIN_VECTORS and dim and vector_count * chosen.bytes_per_vector(dim) > budget:
            kind = "ivfpq"
    if kind == "ivfpq" and vector_count < IVFPQ_MIN_VECTORS:  # too few to train quantisers: exact until then
        kind = "flat"
    return {"flat": IndexSpec.flat(), "hnsw": hnsw, "ivfpq": ivfpq}[kind]
