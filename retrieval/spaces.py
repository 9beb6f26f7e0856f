"""The stored spaces of one archive: :class:`SpaceServices` serves any of them beside the configured one.

2-D and 3-D spaces, other poolings and archive-fitted transforms of one archive share a database; a
request names the space it searches by key. :func:`space_json` is how every JSON output shows a space.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from retrieval.domain.architectures import model_dims
from retrieval.errors import ConflictError, InvalidRequestError, NotFoundError
from retrieval.model.weights import placeholder_label
from retrieval.service import SpaceService
from retrieval.storage.orm import Space

logger = logging.getLogger(__name__)


def space_json(space: Space) -> dict[str, Any]:
    """A space as JSON outputs show it; random weights read ``random-init``, the fake encoder ``fake-encoder``."""
    return {
        "key": space.key,
        "model": space.model,
        "weights": placeholder_label(space.weights) or space.weights,
        "input_size": space.input_size,
        "dims": model_dims(space.model),
        "preprocessing": space.preprocessing,
        "pooling": space.pooling,
        "dim": space.dim,
    }


class SpaceServices:
    """The configured space's service, plus one per other stored space, built on first use.

    2-D and 3-D spaces (or spaces with other poolings) share one database; a request names the
    space it searches by key (or a prefix of at least 8 characters). Another space is served
    with this server's settings changed to that space's model, input size and pooling, and only
    when those settings reproduce the space exactly (same weights identity): a server never
    encodes queries into a space with a different encoder than the one that built it.
    """

    def __init__(self, default: SpaceService) -> None:
        self.default = default
        self._others: dict[str, SpaceService] = {}
        self._lock = threading.Lock()

    def get(self, key: str | None) -> SpaceService:
        if not key:
            return self.default
        space = self._find(key.strip().lower())
        if space.key == self.default.space.key:
            return self.default
        with self._lock:
            service = self._others.get(space.key)
            if service is None:
                service = self._build(space)
                self._others[space.key] = service
            return service

    def _find(self, key: str) -> Space:
        if len(key) < 8:
            raise InvalidRequestError("space: give the space key or at least its first 8 characters",
                                      detail={"field": "space"})
        matches = [space for space in self.default.store.list_spaces() if space.key.startswith(key)]
        if not matches:
            raise NotFoundError(f"space {key!r} does not exist (GET /v1/spaces lists them)", detail={"field": "space"})
        if len(matches) > 1:
            raise InvalidRequestError(f"space {key!r} is ambiguous: give more characters", detail={"field": "space"})
        return matches[0]

    def _build(self, space: Space) -> SpaceService:
        size_field = "volume_max_voxels" if model_dims(space.model) == 3 else "input_size"
        settings = self.default.settings.replaced(model=space.model, pooling=space.pooling, **{size_field: space.input_size})
        service = SpaceService(settings, store=self.default.store)
        service.observe = self.default.observe
        identity = service.identity()
        if identity.key != space.key:
            raise ConflictError(
                f"space {space.key[:12]} was built with weights {space.weights!r} and preprocessing "
                f"{space.preprocessing!r}; this server's settings give {identity.weights!r} / {identity.preprocessing!r}, "
                "so it cannot encode queries for that space",
                detail={"field": "space", "space": space.key},
            )
        logger.info("serving space %s (%s, %s) beside %s", space.key[:12], space.model, space.pooling,
                    self.default.space.key[:12])
        return service

    def close(self) -> None:
        """Close the services of other spaces; their store is the default service's, closed by its owner."""
        for service in self._others.values():
            service.close(keep_store=True)
