"""Similar-case search: a typed query and options in, grouped hits out as the one JSON payload.

Contract of :func:`search_vector`: fetches ``k * overfetch`` images, drops FAISS ``-1`` ids and
ids without a database row, applies the filters, groups images by study (a study's score is its
best image's score) and returns the top ``k`` studies (or images with ``group_by="image"``).
When filters leave fewer than ``k`` groups it widens the fetch, up to the whole index.

:func:`search` turns a :class:`Query` (a file, uploaded bytes, a stored image id or a vector) into
a vector through the space's :class:`~retrieval.service.SpaceService` and returns the payload that
the CLI prints with ``--json`` and the API returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from retrieval.domain.evaluation import neighbour_label_scores
from retrieval.domain.filters import Filters
from retrieval.errors import InvalidRequestError, NotFoundError
from retrieval.query.inputs import (
    decode_query_bytes,
    decode_query_file,
    query_patient_hash,
)
from retrieval.query.rerank import DEFAULT_DEPTH, Rescorer, latent_rescorer
from retrieval.query.results import ImageHit, StudyHit, results_json
from retrieval.service import SpaceService
from retrieval.storage.cohorts import cohort_image_ids
from retrieval.storage.orm import ImageRecord

DEFAULT_TEXT_WEIGHT = 0.5
MAX_TEXT_CHARS = 2000


@dataclass
class Query:
    """What to search with: one of a file path, uploaded bytes, a stored image id or a vector, and/or a text (a space
    with a text tower), and/or relevance-feedback examples."""

    path: str | Path | None = None
    data: bytes | None = None
    data_name: str = "upload"
    image_id: int | None = None
    vector: np.ndarray | None = None
    #: relevance feedback: stored images the results should be more like / less like (Rocchio)
    positive: tuple[int, ...] = ()
    negative: tuple[int, ...] = ()
    #: a text query (spaces with a text tower), alone or combined with the image: (1 - w) * image + w * text
    text: str | None = None
    text_weight: float = DEFAULT_TEXT_WEIGHT

    def describe(self) -> dict[str, Any]:
        """The ``query`` field of the payload."""
        feedback = {"positive": list(self.positive), "negative": list(self.negative)} if self.positive or self.negative else {}
        if self.text is not None:
            feedback |= {"text": self.text} | ({"text_weight": self.text_weight} if self.has_image else {})
        if self.image_id is not None:
            return {"image_id": self.image_id, **feedback}
        if self.path is not None:
            return {"source": str(self.path), **feedback}
        if self.data is not None:
            return {"source": self.data_name, **feedback}
        return {"source": "vector" if self.vector is not None else "text" if self.text is not None else "feedback",
                **feedback}

    @property
    def has_image(self) -> bool:
        return any(value is not None for value in (self.path, self.data, self.image_id, self.vector))


@dataclass
class SearchOptions:
    """How to search: how many groups, filters, grouping, same-patient exclusion and ordering."""

    k: int = 10
    filters: Filters = field(default_factory=Filters)
    group_by: Literal["study", "image", "patient"] = "study"
    exclude_same_patient: bool = False
    sort: str = "score"
    exclude_self: bool = False  # an image_id query: leave the query image itself out
    rerank: Literal["none", "latent"] = "none"  # re-score the ANN's top rerank_depth with the stored latents
    rerank_depth: int = DEFAULT_DEPTH


def search(service: SpaceService, query: Query, options: SearchOptions) -> dict[str, Any]:
    """Search the service's space; returns the ``--json`` / API payload (without ``took_ms``)."""
    vector, patient_hash, query_z = _query_vector(service, query) if query.has_image else (None, None, None)
    if query.text is not None:
        vector = with_text(service, vector, query.text, query.text_weight)
    if query.positive or query.negative:
        vector = rocchio(service, vector, query.positive, query.negative)
    elif vector is None:
        raise InvalidRequestError("a query needs an image file, an image id, a text, a vector or positive examples",
                                  detail={"field": "image"})
    filters, warnings = options.filters, []
    # the examples were seen already; an image_id query with exclude_self is too
    filters.exclude_image_ids = {*query.positive, *query.negative} | (
        {query.image_id} if options.exclude_self and query.image_id is not None else set())
    if options.exclude_same_patient:
        warnings += _exclude_same_patient(service, query, patient_hash, filters)
    rescore = None
    if options.rerank == "latent" and query_z is None and query.image_id is not None:
        query_z = torch.from_numpy(service.stored_latent(query.image_id))
    if options.rerank == "latent" and query_z is None:
        warnings.append("rerank=latent needs a query image (an upload or an image id): not re-ranked")
    elif options.rerank == "latent":
        rescore = latent_rescorer(service, query_z, options.rerank_depth)
    groups = search_vector(service, vector, k=options.k, filters=filters, group_by=options.group_by, rescore=rescore,
                           depth=options.rerank_depth)
    groups = sort_groups(groups, options.sort)
    if not groups:
        warnings += _what_removed_everything(service, vector, filters)
    hits = [hit for group in groups for hit in group.images]
    return {
        "model": service.model_info(),
        "space": service.space_info(),
        "query": query.describe(),
        "group_by": options.group_by,
        "rerank": "latent" if rescore is not None else "none",
        "results": results_json(groups),
        # label frequencies among the returned images, weighted by score: kNN "CAD on latents"
        "neighbour_labels": neighbour_label_scores(
            [frozenset(hit.image.labels or []) for hit in hits], [hit.score for hit in hits]
        ),
        "warnings": warnings + empty_space_warnings(service)
        + (service.placeholder_warnings() if service.has_text_tower else []),
    }


def _exclude_same_patient(service: SpaceService, query: Query, patient_hash: str | None, filters: Filters) -> list[str]:
    """Exclude the query's patient; without a patient id, a stored query's own study instead (said in a warning)."""
    if patient_hash:
        filters.exclude_patient_hash = patient_hash
        return []
    if query.image_id is not None:
        filters.exclude_study_id = service.store.images_by_id([query.image_id])[query.image_id].study_id
        return ["the query image has no patient id: its own study is excluded instead of its patient's studies"]
    return ["the query has no patient id (not a DICOM with PatientID): no patient could be excluded"]


DIAGNOSIS_NEIGHBOURS = 500


def _what_removed_everything(service: SpaceService, vector: np.ndarray, filters: Filters) -> list[str]:
    """When filters leave nothing, say how many of the nearest images each condition alone keeps."""
    conditions = filters.conditions()
    index = service.searchable_index()
    if not conditions or index.count == 0:
        return []
    hits = index.search(vector, min(index.count, DIAGNOSIS_NEIGHBOURS))[0]
    rows = service.store.images_by_id([image_id for image_id, _ in hits])
    kept = [
        f"{name} keeps {sum(1 for image_id, score in hits if image_id in rows and alone.accepts(rows[image_id], score))}"
        for name, alone in conditions
    ]
    return [f"no image passes all the filters; of the {len(hits)} nearest images, " + ", ".join(kept)]


def run_search(
    service: SpaceService,
    *,
    filter_pairs: list[str] | None = None,
    filters: Filters | None = None,
    k: int = 10,
    group_by: str = "study",
    exclude_same_patient: bool = False,
    sort: str = "score",
    exclude_self: bool = False,
    rerank: str = "none",
    **query: Any,
) -> dict[str, Any]:
    """Keyword form of :func:`search`: ``query`` holds :class:`Query` fields, filters come as
    ``key=value`` strings (``filter_pairs``) or ready :class:`Filters`."""
    if group_by not in ("study", "image", "patient"):
        raise InvalidRequestError("group_by must be `study`, `image` or `patient`", detail={"field": "group_by"})
    if rerank not in ("none", "latent"):
        raise InvalidRequestError("rerank must be `none` or `latent`", detail={"field": "rerank"})
    options = SearchOptions(
        k=k, filters=filters or Filters.parse(filter_pairs or []), group_by=group_by,  # type: ignore[arg-type]
        exclude_same_patient=exclude_same_patient, sort=sort, exclude_self=exclude_self,
        rerank=rerank,  # type: ignore[arg-type]
    )
    return search(service, Query(**query), options)


def _query_vector(service: SpaceService, query: Query) -> tuple[np.ndarray, str | None, Any]:
    """The query's vector in the service's space, its patient hash (when known) and, for a decoded query, its z
    (a stored query's z is read only when a re-rank needs it)."""
    if query.image_id is not None:
        rows = service.store.images_by_id([query.image_id])
        if query.image_id not in rows:
            raise NotFoundError(f"image {query.image_id} does not exist", detail={"image_id": query.image_id})
        return stored_vector(service, query.image_id), rows[query.image_id].patient_hash, None  # z: read when re-ranking
    if query.path is not None:
        decoded = decode_query_file(service, query.path)
    elif query.data is not None:
        decoded = decode_query_bytes(service, query.data, query.data_name)
    elif query.vector is not None:
        return query.vector, None, None
    else:
        raise InvalidRequestError("a query needs an image file, an image id or a vector", detail={"field": "image"})
    z, vector = service.embed(decoded)
    return vector, query_patient_hash(decoded, service.settings.privacy.id_secret), z


def search_vector(
    service: SpaceService,
    vector: np.ndarray,
    *,
    k: int = 10,
    filters: Filters | None = None,
    group_by: Literal["study", "image", "patient"] = "study",
    rescore: Rescorer | None = None,
    depth: int = DEFAULT_DEPTH,
) -> list[StudyHit]:
    """Top-``k`` studies (or single images) for a query vector of the service's space; with ``rescore``,
    the top ``depth`` ANN hits re-scored (one pass: nothing beyond them is returned)."""
    if k < 1:
        raise InvalidRequestError("k must be at least 1", detail={"field": "k"})
    filters = filters or Filters()
    index = service.searchable_index()
    total = index.count
    cohort = cohort_image_ids(service.store, index, filters) if total else None
    if cohort is not None:  # a selective cohort: FAISS searches among its images only
        total = min(total, len(cohort))
    fetch = min(total, max(k * service.settings.query.overfetch, depth if rescore else 0))
    while True:
        tick = time.perf_counter()
        hits = index.search(vector, fetch, among=cohort)[0] if fetch else []
        if rescore is not None:
            hits = rescore(hits)
        service.observe("search_seconds", time.perf_counter() - tick)
        rows = service.store.images_by_id([image_id for image_id, _ in hits])
        groups = _group(hits, rows, filters, group_by)
        if len(groups) >= k or fetch >= total or rescore is not None:
            return groups[:k]
        fetch = min(total, fetch * 4)


def _group(
    hits: list[tuple[int, float]], rows: dict[int, ImageRecord], filters: Filters, group_by: str
) -> list[StudyHit]:
    groups: dict[Any, StudyHit] = {}
    for image_id, score in hits:  # FAISS returns them best first
        image = rows.get(image_id)
        if image is None or not filters.accepts(image, score):
            continue
        key = _group_key(image, group_by)
        group = groups.get(key)
        if group is None:
            group = groups[key] = StudyHit(study=image.study, score=score)
        group.images.append(ImageHit(image=image, score=score))
    return sorted(groups.values(), key=lambda g: g.score, reverse=True)


def _group_key(image: ImageRecord, group_by: str) -> Any:
    """One hit per study, per image, or per patient (an image without a patient id counts as its study's)."""
    if group_by == "image":
        return image.id
    if group_by == "patient":
        return ("patient", image.patient_hash) if image.patient_hash else ("study", image.study_id)
    return image.study_id


def with_text(service: SpaceService, image_vector: np.ndarray | None, text: str, weight: float) -> np.ndarray:
    """The text's vector in the service's space (BiomedCLIP's text tower), or, with an image vector, the two
    combined as clip-retrieval combines them: ``normalise((1 - weight) * image + weight * text)``."""
    text = text.strip()
    if not text or len(text) > MAX_TEXT_CHARS:
        raise InvalidRequestError(f"text: give 1 to {MAX_TEXT_CHARS} characters", detail={"field": "text"})
    if not 0.0 <= weight <= 1.0:
        raise InvalidRequestError("text_weight must be between 0 and 1", detail={"field": "text_weight"})
    text_vector = service.text_vectors([text])[0]
    if image_vector is None:
        return text_vector
    combined = (1.0 - weight) * image_vector.astype(np.float64) + weight * text_vector
    norm = float(np.linalg.norm(combined))
    return (combined / norm if norm > 0 else combined).astype(np.float32)


ROCCHIO = (1.0, 0.75, 0.15)
"""(alpha, beta, gamma): SMART's classic weights, positives pulling four to five times as hard as negatives push."""


def rocchio_vector(query: np.ndarray | None, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Rocchio on L2-normalised vectors, renormalised: alpha * query + beta * mean(positive rows) -
    gamma * mean(negative rows); a term is left out when it has nothing (no query, no rows)."""
    alpha, beta, gamma = ROCCHIO
    moved = np.zeros(positive.shape[1] if positive.size else negative.shape[1], dtype=np.float64)
    if query is not None:
        moved += alpha * query
    if len(positive):
        moved += beta * positive.mean(axis=0)
    if len(negative):
        moved -= gamma * negative.mean(axis=0)
    norm = float(np.linalg.norm(moved))
    return (moved / norm if norm > 0 else moved).astype(np.float32)


def rocchio(service: SpaceService, query: np.ndarray | None, positive: tuple[int, ...], negative: tuple[int, ...]) -> np.ndarray:
    """:func:`rocchio_vector` with the stored vectors of the example images."""
    if query is None and not positive:
        raise InvalidRequestError("feedback without a query needs at least one positive example", detail={"field": "positive"})
    dim = service.space.dim

    def rows(ids: tuple[int, ...]) -> np.ndarray:
        return np.array([stored_vector(service, image_id) for image_id in ids], dtype=np.float32).reshape(-1, dim)

    return rocchio_vector(query, rows(positive), rows(negative))


def stored_vector(service: SpaceService, image_id: int) -> np.ndarray:
    """The query vector of an image already in the archive (its stored vector in this space)."""
    index = service.searchable_index()
    try:
        return index.vectors(np.array([image_id]))[0].astype(np.float32)
    except RuntimeError:
        raise NotFoundError(f"image {image_id} has no vector in this space", detail={"image_id": image_id}) from None


SORT_KEYS = ("score", "psnr", "ssim")


def sort_groups(groups: list[StudyHit], sort: str) -> list[StudyHit]:
    """Order the top-k: by score (default), or by the best image's reconstruction PSNR / SSIM,
    worst first, so that poorly represented (out-of-distribution) cases surface; unscored last."""
    if sort == "score":
        return groups
    if sort not in SORT_KEYS:
        raise InvalidRequestError(f"sort must be one of {', '.join(SORT_KEYS)}", detail={"field": "sort"})
    attribute = "recon_psnr" if sort == "psnr" else "recon_ssim"

    def key(group: StudyHit) -> tuple[bool, float]:
        value = getattr(group.images[0].image, attribute)
        return (value is None, value if value is not None else 0.0)

    return sorted(groups, key=key)


def empty_space_warnings(service: SpaceService) -> list[str]:
    """When the searched space is empty, name the spaces that do hold vectors (settings differ).

    Called right after a search, which has already brought the index up to date with the database.
    """
    if service.index.count > 0:
        return []
    others = []
    for space in service.store.list_spaces():
        count, _ = service.store.vector_stats(space.id)
        if count and space.id != service.space.id:
            others.append(f"{space.key[:12]} (preprocessing={space.preprocessing}, input_size={space.input_size}, "
                          f"pooling={space.pooling}, {count} images)")
    if not others:
        return [f"the archive in {service.settings.storage.location} is empty: ingest a folder or manifest first, or point RETRIEVAL_DATA_DIR "
                "(RETRIEVAL_DATABASE_URL) at the archive you ingested"]
    return ["this space holds no images; the archive has vectors in other spaces: " + "; ".join(others)]
