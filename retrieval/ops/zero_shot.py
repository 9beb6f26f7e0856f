"""Zero-shot labels: stored images scored against text prompts in a space with a text tower (``biomedclip``).

An image's score for a prompt is the cosine of its stored vector and the prompt's text vector (the
same numbers a text search ranks by); its probabilities are CLIP's softmax over the prompts of the
model's temperature-scaled cosines, as CLIP's zero-shot classification computes them. With labels
(``retrieval eval --prompts``) each prompt gets the AUROC of its scores against its label.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from scipy.special import softmax

from retrieval.domain.evaluation import EvalItem
from retrieval.errors import InvalidRequestError
from retrieval.service import SpaceService


@dataclass(frozen=True)
class Prompt:
    """A text prompt and the label it stands for (``effusion=right pleural effusion``; by default the text)."""

    label: str
    text: str


def parse_prompts(text: str) -> list[Prompt]:
    """``"effusion=right pleural effusion, cardiomegaly"`` -> prompts; an empty or repeated one is an error."""
    prompts = []
    for part in text.split(","):
        label, equals, prompt = part.partition("=")
        label, prompt = label.strip(), (prompt if equals else label).strip()
        if not label or not prompt:
            raise InvalidRequestError(f"--prompts: {part.strip()!r} is empty; give `text` or `label=text`, comma-separated",
                                      detail={"field": "prompts"})
        prompts.append(Prompt(label, prompt))
    labels = [prompt.label for prompt in prompts]
    if len(set(labels)) != len(labels):
        raise InvalidRequestError("--prompts: a label is given twice", detail={"field": "prompts"})
    return prompts


@dataclass
class ZeroShotScores:
    """Cosines ``(N, P)`` of N stored images with P prompts, and CLIP's softmax over the prompts."""

    image_ids: list[int]
    prompts: list[Prompt]
    cosines: np.ndarray
    probabilities: np.ndarray


def score_images(service: SpaceService, image_ids: Sequence[int], prompts: list[Prompt], *,
                 image_vectors: np.ndarray | None = None) -> ZeroShotScores:
    """Score stored images of the service's space against ``prompts`` (its text tower; refused without one);
    ``image_vectors``: their vectors when the caller has read them already (else read by id)."""
    text_vectors = service.text_vectors([prompt.text for prompt in prompts])
    if image_vectors is None:
        image_vectors = service.store.vectors_of(service.space.id, list(image_ids))
    cosines = image_vectors @ text_vectors.T
    probabilities = softmax(service.clip.logit_scale * cosines.astype(np.float64), axis=1)
    return ZeroShotScores(list(image_ids), prompts, cosines, probabilities.astype(np.float32))


def space_vectors_by_id(service: SpaceService) -> tuple[list[int], np.ndarray]:
    """Every image id with a vector in the service's space, in storage order, and those vectors (one read)."""
    rows = [row for chunk in service.store.vectors_after(service.space.id) for row in chunk]
    return [row.image_id for row in rows], np.array([row.vector for row in rows], dtype=np.float32).reshape(
        len(rows), service.space.dim)


def score_rows(service: SpaceService, scores: ZeroShotScores) -> Iterator[dict[str, Any]]:
    """One CSV row per image: id, source, study, each prompt's cosine and probability, the top label."""
    rows = service.store.images_by_id(scores.image_ids)
    for position, image_id in enumerate(scores.image_ids):
        image = rows[image_id]
        row: dict[str, Any] = {"image_id": image_id, "source": image.source_uri, "study_uid": image.study.study_uid or ""}
        for column, prompt in enumerate(scores.prompts):
            row[f"cosine:{prompt.label}"] = round(float(scores.cosines[position, column]), 6)
        for column, prompt in enumerate(scores.prompts):
            row[f"p:{prompt.label}"] = round(float(scores.probabilities[position, column]), 6)
        row["top_label"] = scores.prompts[int(np.argmax(scores.cosines[position]))].label
        yield row


def write_csv(handle: IO[str], rows: Iterator[dict[str, Any]]) -> int:
    """Write the rows as CSV (header from the first row); returns how many were written."""
    writer, count = None, 0
    for row in rows:
        if writer is None:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
        writer.writerow(row)
        count += 1
    return count


def prompt_auroc(items: list[EvalItem], scores: ZeroShotScores) -> dict[str, dict[str, Any]]:
    """Per prompt: AUROC of its cosines against its label (None where the label has no positives or no
    negatives among the items), with the counts; items and scores in the same order."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for column, prompt in enumerate(scores.prompts):
        truth = np.array([prompt.label in item.labels for item in items])
        positives = int(truth.sum())
        defined = 0 < positives < len(items)
        auroc = round(float(roc_auc_score(truth, scores.cosines[:, column])), 4) if defined else None
        out[prompt.label] = {"prompt": prompt.text, "auroc": auroc, "positives": positives,
                             "negatives": len(items) - positives}
    return out
