"""Re-rank the ANN's top N with the stored latents (``rerank="latent"``).

Pooling keeps a few numbers per latent cell; every image's whole latent is stored. For the top
``depth`` candidates of the ANN search, :func:`latent_rescorer` replaces the pooled score by the
cosine of the whole latent the space pools (MedVAE's stage-2 grid for images; for volumes z, averaged
onto a fixed grid since volumes differ in shape: :meth:`SpaceService.whole_latents`), flattened:
spatial layout included, which pooling throws away. Candidates beyond ``depth`` are not
returned. The query needs a latent: an uploaded image or a stored one (feedback-only queries
have none, and are not re-ranked). The candidates' stage-2 latents were stored at ingest, so a
re-rank is one SQL read and one matrix product, without the model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from retrieval.service import SpaceService

Rescorer = Callable[[list[tuple[int, float]]], list[tuple[int, float]]]
DEFAULT_DEPTH = 100


def _unit_rows(rows: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(rows.float(), dim=1).numpy()


def latent_rescorer(service: SpaceService, query_z: torch.Tensor, depth: int = DEFAULT_DEPTH) -> Rescorer:
    """A function that re-scores ANN hits (best first) with whole-latent cosines, keeping the top ``depth``."""
    query = _unit_rows(service.whole_latents([torch.as_tensor(query_z)]))[0]

    def rescore(hits: list[tuple[int, float]]) -> list[tuple[int, float]]:
        ids, rows = service.stored_whole_latents([image_id for image_id, _ in hits[:depth]])
        if not ids:
            return []
        scores = _unit_rows(rows) @ query
        return sorted(zip(ids, (float(score) for score in scores), strict=True), key=lambda hit: -hit[1])

    return rescore
