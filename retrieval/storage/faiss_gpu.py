"""FAISS on the GPU where the ``gpu`` extra (faiss-gpu) is installed and a GPU is visible; the CPU otherwise.

Two jobs move: training an IVF index's coarse quantiser (k-means over up to 100,000 vectors into
thousands of lists: minutes on two CPU cores, seconds on a GPU) and bulk exact k-NN (the evaluation
harness's leave-one-out neighbours, the search benchmark's ground truth). Both give the same results
on either device up to float rounding; the CPU path is the one CI runs. Serving stays on the CPU:
one query at a time is memory-bound, and every API replica would otherwise need a GPU.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu (which has no GPU code) or without a visible GPU."""
    count = getattr(faiss, "get_num_gpus", lambda: 0)()
    return int(count)


@functools.lru_cache(maxsize=1)
def _resources() -> Any:
    return faiss.StandardGpuResources()


def knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product of each query row over ``base``: (scores, row indices), best first."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    k = min(k, len(base))
    if gpu_count():
        return faiss.knn_gpu(_resources(), queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)


def train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train ``index`` on ``sample``; an IVF index's coarse k-means runs on every visible GPU when there is one."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if gpu_count():
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        logger.info("training %d lists on %d GPU(s)", ivf.nlist, gpu_count())
    index.train(sample)
