"""Re-index: rebuild a space's index from stored vectors, derive a new pooling from stored z, or fit an
archive transform (centring, PCA-whitening) on a space's vectors and derive its space.

Neither path re-encodes an image (design decision 3): a new pooling reads every stored latent of
the encoder, recomputes the stage-2 latent and pools it. The old index file keeps serving until the
new one replaces it atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select

from retrieval.domain.whitening import fit_transform, stable_fit
from retrieval.errors import InvalidRequestError
from retrieval.model.pooling import PoolingSpec
from retrieval.service import SpaceService
from retrieval.storage.index import SpaceIndex
from retrieval.storage.index_spec import choose_index_spec
from retrieval.storage.orm import Space, Vector
from retrieval.storage.transforms import save_transform, space_vectors

logger = logging.getLogger(__name__)


@dataclass
class ReindexReport:
    space_key: str
    pooling: str
    vectors_added: int
    index_count: int


def reindex(service: SpaceService, *, pooling: PoolingSpec | None = None, transform: str | None = None,
            batch: int = 256) -> ReindexReport:
    """Rebuild the index of the configured space, or of ``pooling``'s space (filled from stored z).

    With ``transform`` (``center`` / ``whiten``) the transform is fitted on the vectors of that space
    (its pooling without any transform, filled first if need be), stored under its key, and a new space
    ``<pooling>+<transform>:<key>`` is filled from stored z: a refit is always a new space.
    """
    target, added = pooling or service.pooling, 0
    if transform is not None:
        base, added = _filled_space(service, target.base, batch)
        vectors = space_vectors(service.store, base)
        try:
            fitted = fit_transform(vectors, transform)
        except ValueError as exc:
            raise InvalidRequestError(f"--transform: {exc}", detail={"field": "transform"}) from exc
        if transform == "whiten" and not stable_fit(len(vectors), base.dim):
            logger.warning("whitening fitted on %d vectors of %d values: fewer than %d, so its weakest directions "
                           "are set by the shrinkage; refit when the archive has grown", len(vectors), base.dim,
                           2 * base.dim + 1)
        save_transform(service.store, fitted, fitted_space=base.key, fitted_vectors=len(vectors))
        target = target.base.with_transform(fitted.suffix)
        logger.info("fitted %s on %d vectors of space %s: key %s", transform, len(vectors), base.key[:12], fitted.key)
    space, more = _filled_space(service, target, batch)
    count, _ = service.store.vector_stats(space.id)
    index = SpaceIndex(space=space, directory=service.settings.storage.index_dir, spec=choose_index_spec(count, service.settings, space.dim))
    index.rebuild(service.store)
    logger.info("reindex %s (%s): %d vectors added, index holds %d", space.key[:12], space.pooling, added + more,
                index.count)
    return ReindexReport(space_key=space.key, pooling=space.pooling, vectors_added=added + more, index_count=index.count)


def _filled_space(service: SpaceService, spec: PoolingSpec, batch: int) -> tuple[Space, int]:
    """The space of ``spec`` (the configured one, or one derived from stored z) and how many vectors were added."""
    if spec.canonical == service.pooling.canonical:
        return service.space, 0
    space = service.store.ensure_space(service.identity(spec))
    return space, _pool_missing(service, space_id=space.id, encoder_key=space.encoder_key, spec=spec, batch=batch)


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
