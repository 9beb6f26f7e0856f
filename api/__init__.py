"""HTTP API of medvae-retrieval (FastAPI). Build it with :func:`api.main.create_app`."""

import retrieval  # noqa: F401 - its import sets the OpenMP wait policy before PyTorch or FAISS load
