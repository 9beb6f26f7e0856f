"""HTTP API of medvae-retrieval (FastAPI). Build it with :func:`api.main.create_app`."""
