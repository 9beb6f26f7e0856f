"""Retrieval quality on a labelled set: leave-one-out precision@k, recall@k, mAP@k, per label.

Pure functions over vectors and labels (no database), so the metrics are checked against hand
computations in the tests. Definitions, for a query q with label set L(q) (multi-label allowed):

* candidates: every other item, minus q itself, minus items of q's patient when
  ``exclude_same_patient`` (the usual leakage guard), and at study level minus q's own study;
* a neighbour is *relevant* when it shares at least one label with q;
* precision@k = relevant among the top k / k; recall@k = relevant among the top k / all relevant
  candidates; AP@k = sum over relevant ranks i <= k of precision@i / min(k, all relevant);
  mAP@k = mean AP@k over queries with at least one relevant candidate (the others are counted in
  ``queries_without_relevant`` and excluded from recall and mAP, never scored as zero);
* study level: candidates are studies, scored by their best image, labelled by the union of their
  images' labels.
* per label L: precision@k over the queries carrying L, where relevant = the neighbour carries L.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EvalItem:
    image_id: int
    study_id: int
    labels: frozenset[str]
    patient: str | None = None


@dataclass
class Ranking:
    """One query's ranked candidates (ids and label sets), best first."""

    query: EvalItem
    labels: list[frozenset[str]]
    relevant_total: int


@dataclass
class EvalResult:
    level: str
    ks: list[int]
    queries: int
    queries_without_relevant: int
    precision: dict[int, float]
    recall: dict[int, float]
    map: dict[int, float]
    per_label: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "queries": self.queries,
            "queries_without_relevant": self.queries_without_relevant,
            "precision_at_k": {str(k): round(v, 4) for k, v in self.precision.items()},
            "recall_at_k": {str(k): round(v, 4) for k, v in self.recall.items()},
            "map_at_k": {str(k): round(v, 4) for k, v in self.map.items()},
            "per_label": self.per_label,
        }


def rankings(
    items: list[EvalItem], vectors: np.ndarray | None, *, level: str = "image", exclude_same_patient: bool = False,
    scores: np.ndarray | None = None,
) -> list[Ranking]:
    """Leave-one-out rankings by inner product (vectors are L2-normalised: cosine), or by a given
    ``scores`` matrix (row = query, column = candidate; re-ranking and feedback build their own)."""
    if level not in ("image", "study"):
        raise ValueError("level must be `image` or `study`")
    if scores is None:
        assert vectors is not None
        scores = vectors @ vectors.T
    study_labels: dict[int, frozenset[str]] = defaultdict(frozenset)
    for item in items:
        study_labels[item.study_id] = study_labels[item.study_id] | item.labels
    out: list[Ranking] = []
    for q, query in enumerate(items):
        allowed = [
            j for j, other in enumerate(items)
            if j != q
            and not (exclude_same_patient and query.patient is not None and other.patient == query.patient)
            and not (level == "study" and other.study_id == query.study_id)
        ]
        order = sorted(allowed, key=lambda j: (-scores[q, j], items[j].image_id))
        if level == "image":
            labels = [items[j].labels for j in order]
        else:
            seen: set[int] = set()
            labels = []
            for j in order:  # a study ranks at its best image
                if items[j].study_id not in seen:
                    seen.add(items[j].study_id)
                    labels.append(study_labels[items[j].study_id])
        relevant_total = sum(1 for candidate in labels if candidate & query.labels)
        out.append(Ranking(query=query, labels=labels, relevant_total=relevant_total))
    return out


def evaluate(ranked: list[Ranking], ks: list[int], *, level: str = "image") -> EvalResult:
    precision = {k: [] for k in ks}
    recall = {k: [] for k in ks}
    average_precision = {k: [] for k in ks}
    without = 0
    for ranking in ranked:
        relevant = [bool(candidate & ranking.query.labels) for candidate in ranking.labels]
        for k in ks:
            precision[k].append(sum(relevant[:k]) / k)
        if ranking.relevant_total == 0:
            without += 1
            continue
        for k in ks:
            recall[k].append(sum(relevant[:k]) / ranking.relevant_total)
            hits, total = 0, 0.0
            for rank, is_relevant in enumerate(relevant[:k], start=1):
                if is_relevant:
                    hits += 1
                    total += hits / rank
            average_precision[k].append(total / min(k, ranking.relevant_total))
    result = EvalResult(
        level=level,
        ks=ks,
        queries=len(ranked),
        queries_without_relevant=without,
        precision={k: _mean(v) for k, v in precision.items()},
        recall={k: _mean(v) for k, v in recall.items()},
        map={k: _mean(v) for k, v in average_precision.items()},
    )
    result.per_label = per_label_precision(ranked, ks)
    return result


def per_label_precision(ranked: list[Ranking], ks: list[int]) -> dict[str, dict[str, Any]]:
    """precision@k per label over the queries carrying it (relevant = neighbour carries the label)."""
    table: dict[str, dict[str, Any]] = {}
    labels = sorted({label for ranking in ranked for label in ranking.query.labels})
    for label in labels:
        queries = [r for r in ranked if label in r.query.labels]
        row: dict[str, Any] = {"queries": len(queries)}
        for k in ks:
            row[f"precision_at_{k}"] = round(_mean([sum(label in c for c in r.labels[:k]) / k for r in queries]), 4)
        table[label] = row
    return table


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def recall_of_exact(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Fidelity of a pooled space to a reference space: mean overlap of leave-one-out top-k sets."""
    def top(vectors: np.ndarray) -> np.ndarray:
        scores = vectors @ vectors.T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1)[:, :k]

    a, e = top(approx), top(exact)
    return float(np.mean([len(set(a[i]) & set(e[i])) / k for i in range(len(a))]))


# -- neighbour label voting ("CAD on latents")


def neighbour_label_scores(labels: list[frozenset[str]], scores: list[float]) -> dict[str, float]:
    """Label frequencies among neighbours, weighted by (positive) similarity, normalised to [0, 1]."""
    weights = [max(0.0, float(s)) for s in scores]
    total = sum(weights)
    if total <= 0:
        return {}
    votes: dict[str, float] = defaultdict(float)
    for label_set, weight in zip(labels, weights, strict=True):
        for label in label_set:
            votes[label] += weight
    return {label: round(vote / total, 4) for label, vote in sorted(votes.items(), key=lambda kv: -kv[1])}


def split_by_study(items: list[EvalItem], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a train / test split that never puts one study (or patient) on both sides."""
    groups = sorted({item.patient or f"study:{item.study_id}" for item in items})
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    test_groups = set(groups[: max(1, round(len(groups) * test_fraction))])
    test = [i for i, item in enumerate(items) if (item.patient or f"study:{item.study_id}") in test_groups]
    train = [i for i in range(len(items)) if i not in set(test)]
    return train, test


def knn_classification(
    items: list[EvalItem], vectors: np.ndarray, *, k: int = 10, test_fraction: float = 0.3, seed: int = 0
) -> dict[str, Any]:
    """kNN label voting from a train split to a held-out split: accuracy (vote >= 0.5) and AUROC per label."""
    from sklearn.metrics import roc_auc_score

    train, test = split_by_study(items, test_fraction, seed)
    if not train or not test:
        raise ValueError("need at least two studies (or patients) to split")
    scores = vectors[test] @ vectors[train].T
    labels = sorted({label for item in items for label in item.labels})
    votes = []
    for row in scores:
        top = np.argsort(-row)[:k]
        votes.append(neighbour_label_scores([items[train[j]].labels for j in top], [row[j] for j in top]))
    table: dict[str, dict[str, Any]] = {}
    for label in labels:
        truth = np.array([label in items[i].labels for i in test])
        score = np.array([vote.get(label, 0.0) for vote in votes])
        row: dict[str, Any] = {"positives": int(truth.sum()), "negatives": int((~truth).sum()),
                               "accuracy": round(float(np.mean((score >= 0.5) == truth)), 4)}
        row["auroc"] = round(float(roc_auc_score(truth, score)), 4) if 0 < truth.sum() < len(truth) else None
        table[label] = row
    return {"k": k, "train": len(train), "test": len(test), "seed": seed, "per_label": table}
