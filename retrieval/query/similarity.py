"""Where two images match: cosine similarity of their stage-2 latent cells, position by position.

The S2 latent is a ``(C, h, w)`` grid (``h = w = input_size / 8`` for medvae_8_4_2d); each cell
summarises an 8x8 pixel patch of the square, padded model input. Both images are laid out the
same way (aspect-preserving resize, centred), so cell ``(i, j)`` of the query and of the target
cover the same place of the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from retrieval.errors import InvalidRequestError
from retrieval.service import SpaceService


@dataclass
class SimilarityMap:
    cells: np.ndarray  # (h, w) cosine in [-1, 1]
    score: float  # cosine of the pooled vectors (the search score)
    query_z: torch.Tensor  # (C, h, w), for a reconstruction of the query


def cell_cosine(query: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """``(C, h, w)`` x ``(C, h, w)`` -> ``(h, w)`` cosine similarity of each cell's channel vector."""
    if query.shape != target.shape:
        raise ValueError(f"latent grids differ: {tuple(query.shape)} vs {tuple(target.shape)}")
    return torch.nn.functional.cosine_similarity(query, target, dim=0, eps=1e-8).numpy()


def stored_z(service: SpaceService, image_id: int) -> torch.Tensor:
    return torch.from_numpy(service.stored_latent(image_id))


def similarity_map(service: SpaceService, query_z: torch.Tensor, target_id: int) -> SimilarityMap:
    """Cell-wise similarity between a query latent and a stored image, plus their search score (2-D spaces:
    volumes differ in shape, so their grids do not line up cell by cell)."""
    if service.is_volume_space:
        raise InvalidRequestError("similarity maps compare 2-D images; this is a 3-D space", detail={"field": "space"})
    target_z = stored_z(service, target_id)
    s2 = service.head_latent(torch.stack([query_z, target_z]))
    vectors = service.vectors_of(torch.stack([query_z, target_z]))
    return SimilarityMap(
        cells=cell_cosine(s2[0], s2[1]),
        score=float(np.dot(vectors[0], vectors[1])),
        query_z=query_z,
    )


def query_latent(service: SpaceService, *, data: bytes | None, name: str, image_id: int | None) -> torch.Tensor:
    """z of a query: encoded from file bytes, or the stored z of an archived image."""
    if data is None:
        if image_id is None:
            raise ValueError("a query needs bytes or an image id")
        return stored_z(service, image_id)
    from retrieval.imaging.decode import decode_bytes

    decoded = decode_bytes(data, name=name, max_pixels=service.settings.ingest.max_image_pixels)
    return service.embed(decoded)[0]
