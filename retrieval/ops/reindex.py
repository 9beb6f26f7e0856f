"""Re-index: rebuild a space's index from stored vectors, or derive a new pooling from stored z.

Neither path re-encodes an image (design decision 3): a new pooling reads every stored latent of
the encoder, recomputes the stage-2 latent and pools it. The old index file keeps serving until the
new one replaces it atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select

from retrieval.model.pooling import PoolingSpec
from retrieval.service import SpaceService
from retrieval.storage.index import SpaceIndex, choose_index_spec
from retrieval.storage.orm import Vector

logger = logging.getLogger(__name__)


@dataclass
class ReindexReport:
    space_key: str
    pooling: str
    vectors_added: int
    index_count: int


def reindex(service: SpaceService, *, pooling: PoolingSpec | None = None, batch: int = 256) -> ReindexReport:
    """Rebuild the index of the configured space, or of ``pooling``'s space (filled from stored z)."""
    if pooling is None or pooling.canonical == service.pooling.canonical:
        space = service.space
        added = 0
    else:
        space = service.store.ensure_space(service.identity(pooling))
        added = _pool_missing(service, space_id=space.id, encoder_key=space.encoder_key, spec=pooling, batch=batch)
    count, _ = service.store.vector_stats(space.id)
    index = SpaceIndex(space=space, directory=service.settings.storage.index_dir, spec=choose_index_spec(count, service.settings))
    index.rebuild(service.store)
    logger.info("reindex %s (%s): %d vectors added, index holds %d", space.key[:12], space.pooling, added, index.count)
    return ReindexReport(space_key=space.key, pooling=space.pooling, vectors_added=added, index_count=index.count)


def _pool_missing(service: SpaceService, *, space_id: int, encoder_key: str, spec: PoolingSpec, batch: int) -> int:
    with service.store.sessions() as session:
        done = set(session.scalars(select(Vector.image_id).where(Vector.space_id == space_id)))
    space = service.store.get_space_by_id(space_id)
    added = 0
    for chunk in service.store.latents(encoder_key, chunk=batch):
        todo = [(image_id, z) for image_id, z in chunk if image_id not in done]
        if not todo:
            continue
        vectors = service.pooled([latent for _, latent in todo], spec)
        service.store.add_vectors(space=space, vectors=[(image_id, vectors[i]) for i, (image_id, _) in enumerate(todo)])
        added += len(todo)
    return added
