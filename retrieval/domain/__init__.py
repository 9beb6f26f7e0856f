"""Pure domain objects: embedding-space identity, image metadata, search filters, retrieval metrics.

Nothing here imports torch, SQLAlchemy or an image library; every other layer may import it.
"""
