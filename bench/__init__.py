"""Benchmark scripts (``python -m bench.<name>``): each prints figures and writes JSON to ``bench/results/``."""

import retrieval  # noqa: F401 - its import sets the OpenMP wait policy before PyTorch or FAISS load, as in the service
