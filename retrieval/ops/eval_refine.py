"""What refining a search buys on a labelled archive: re-ranking with whole latents, rounds of
simulated relevance feedback, and archive-fitted transforms of the vectors (centring,
PCA-whitening; issue 15), side by side with the plain pooled vectors.

Leave-one-out at image level, like ``retrieval eval``. Re-ranking re-scores each query's top
``depth`` (by pooled vectors) with the cosine of the whole latent the space pools, as
``rerank=latent`` does. Feedback simulates a reader: in each round the first page (the largest k)
is judged by the labels, same-label images marked relevant and the others not, and the query
vector moves by Rocchio (:func:`retrieval.query.search.rocchio_vector`) towards the first query plus
the marks so far. Transforms are fitted on every vector of the space, as ``retrieval reindex
--transform`` fits them, and reported with the spread of the scores between labelled images (the
plain scores of one archive pile up near 1.0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from retrieval.domain.evaluation import EvalItem, evaluate, rankings
from retrieval.domain.whitening import METHODS, fit_transform
from retrieval.errors import InvalidRequestError
from retrieval.query.search import rocchio_vector
from retrieval.service import SpaceService
from retrieval.storage.transforms import space_vectors

BELOW = 10.0  # pushes candidates beyond the re-ranked depth below every re-ranked one


def refinement_study(
    service: SpaceService, items: list[EvalItem], ks: list[int], *, rounds: int = 3, depth: int = 100,
    exclude_same_patient: bool = False,
) -> dict[str, Any]:
    """``{"plain": P@k, "rerank_latent": P@k, "feedback": [P@k after round 1, 2, ...], "center": P@k,
    "whiten": P@k, "scores": {"plain" | "center" | "whiten": {"mean", "std"}}}`` (image level)."""
    ids = [item.image_id for item in items]
    vectors = service.store.vectors_of(service.space.id, ids)
    kept, whole = service.stored_whole_latents(ids)
    if kept != ids:
        raise InvalidRequestError("some labelled images have no stored latent in this space")
    whole = torch.nn.functional.normalize(whole, dim=1).numpy()
    plain = vectors @ vectors.T

    def precision(scores: np.ndarray) -> dict[str, float]:
        ranked = rankings(items, None, scores=scores, exclude_same_patient=exclude_same_patient)
        return evaluate(ranked, ks).as_dict()["precision_at_k"]

    transformed = _transformed(service, vectors)
    return {
        "plain": precision(plain),
        "rerank_latent": precision(_reranked(plain, whole @ whole.T, depth)),
        "feedback": [precision(scores) for scores in _feedback_rounds(items, vectors, plain, max(ks), rounds)],
        **{method: precision(moved @ moved.T) for method, moved in transformed.items()},
        "scores": {name: _spread(matrix) for name, matrix in [("plain", vectors), *transformed.items()]},
        "depth": depth,
        "rounds": rounds,
    }


def _transformed(service: SpaceService, vectors: np.ndarray) -> dict[str, np.ndarray]:
    """``vectors`` under each transform (:data:`~retrieval.domain.whitening.METHODS`) fitted on the whole space."""
    archive = space_vectors(service.store, service.space)
    return {method: fit_transform(archive, method).apply(vectors) for method in METHODS}


def _spread(vectors: np.ndarray) -> dict[str, float]:
    """Mean and standard deviation of the cosines between different images."""
    scores = vectors @ vectors.T
    others = scores[~np.eye(len(scores), dtype=bool)]
    return {"mean": round(float(others.mean()), 4), "std": round(float(others.std()), 4)}


def _reranked(plain: np.ndarray, latent: np.ndarray, depth: int) -> np.ndarray:
    scores = plain - BELOW
    for q in range(len(plain)):
        order = [j for j in np.argsort(-plain[q], kind="stable") if j != q][:depth]
        scores[q, order] = latent[q, order]
    return scores


def _feedback_rounds(items: list[EvalItem], vectors: np.ndarray, plain: np.ndarray, page: int, rounds: int) -> list[np.ndarray]:
    positive: list[set[int]] = [set() for _ in items]
    negative: list[set[int]] = [set() for _ in items]
    scores, out = plain, []
    for _ in range(rounds):
        moved = np.empty_like(vectors, dtype=np.float32)
        for q, query in enumerate(items):
            shown = [j for j in np.argsort(-scores[q], kind="stable") if j != q][:page]
            for j in shown:
                (positive[q] if items[j].labels & query.labels else negative[q]).add(j)
            moved[q] = rocchio_vector(vectors[q], vectors[sorted(positive[q])], vectors[sorted(negative[q])])
        scores = moved @ vectors.T
        out.append(scores)
    return out
