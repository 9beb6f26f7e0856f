"""Retrieval metrics against hand-computed values; the eval command on a tiny labelled archive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from conftest import make_archive

from retrieval.domain.evaluation import EvalItem, evaluate, rankings, recall_of_exact

# 4 images in 2-D; scores: AB .8, AC .6, AD 0, BC .96, BD .6, CD .8
A = EvalItem(1, 1, frozenset({"x"}))
B = EvalItem(2, 1, frozenset({"x"}))
C = EvalItem(3, 2, frozenset({"y"}))
D = EvalItem(4, 3, frozenset({"x", "y"}))
VECTORS = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], np.float32)


def test_image_level_metrics_match_hand_computation() -> None:
    result = evaluate(rankings([A, B, C, D], VECTORS), [1, 2, 3])
    assert result.precision[1] == pytest.approx(0.5)
    assert result.precision[3] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1) / 4)
    # AP@3: A (1 + 2/3)/2, B (1/2 + 2/3)/2, C (1/2)/1, D 1
    assert result.map[3] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2 + 0.5 + 1) / 4)
    assert result.recall[1] == pytest.approx((0.5 + 0 + 0 + 1 / 3) / 4)
    assert result.recall[3] == pytest.approx(1.0)
    assert result.per_label["x"]["queries"] == 3 and result.per_label["x"]["precision_at_1"] == pytest.approx(1 / 3, abs=1e-4)
    assert result.queries_without_relevant == 0


def test_study_level_and_same_patient_exclusion() -> None:
    study = rankings([A, B, C, D], VECTORS, level="study")
    assert [sorted(labels) for labels in study[0].labels] == [["y"], ["x", "y"]]  # A's own study (B) left out
    assert evaluate(study, [1], level="study").per_label["x"]["queries"] == 3
    a_patient = EvalItem(1, 1, frozenset({"x"}), patient="p1")
    d_patient = EvalItem(4, 3, frozenset({"x", "y"}), patient="p1")
    excluded = rankings([a_patient, B, C, d_patient], VECTORS, exclude_same_patient=True)
    assert excluded[0].relevant_total == 1 and len(excluded[0].labels) == 2
    assert evaluate(excluded[:1], [3]).map[3] == pytest.approx(1.0)


def test_recall_of_exact_is_one_for_the_same_space() -> None:
    vectors = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert recall_of_exact(vectors, vectors, k=5) == 1.0
    assert recall_of_exact(vectors[:, :2] / np.linalg.norm(vectors[:, :2], axis=1, keepdims=True), vectors, k=5) < 1.0


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # the store reads it uses are covered on PG elsewhere
def test_eval_command_report_pooling_study_and_near_duplicates(cli_env: dict[str, str], tmp_path: Path) -> None:
    files = make_archive(tmp_path / "archive", studies=4, per_study=3)
    manifest = tmp_path / "labels.csv"
    labels = [f"{'effusion' if i % 2 else 'normal'}{'|device' if i % 3 == 0 else ''}" for i in range(len(files))]
    rows = ["path,finding,labels"] + [f"{f},{label},{label}" for f, label in zip(files, labels, strict=True)]
    manifest.write_text("\n".join(rows) + "\n")
    missing = run_cli(cli_env, "eval", str(manifest), "--label-column", "finding", check=False)
    assert missing.returncode == 2 and "not in the archive" in missing.stderr
    run_cli(cli_env, "ingest", str(manifest), "--no-progress")  # stores the `labels` column with each image
    out = json.loads(run_cli(
        cli_env, "eval", str(manifest), "--label-column", "finding", "--k", "1,3", "--json",
        "--report", str(tmp_path / "report"), "--poolings", "mean,spp:1,2,4,grid:2,gem:3", "--near-duplicates",
        "--refine",
    ).stdout)
    refined = out["refinement"]  # issue 15: plain, re-ranked and three rounds of simulated feedback, side by side
    assert refined["plain"] == out["results"]["image"]["precision_at_k"]  # the same leave-one-out protocol
    assert len(refined["feedback"]) == 3 and refined["rounds"] == 3
    assert all(0.0 <= value <= 1.0 for row in [refined["rerank_latent"], *refined["feedback"], refined["center"],
                                               refined["whiten"]] for value in row.values())
    spread = refined["scores"]  # archive-fitted transforms: the scores between images stop piling up near 1
    assert spread["plain"]["mean"] > spread["center"]["mean"] and spread["plain"]["std"] < spread["whiten"]["std"]
    assert out["items"] == 12 and out["not_in_archive"] == 0
    assert set(out["results"]) == {"image", "study"}
    assert 0.0 <= out["results"]["image"]["precision_at_k"]["1"] <= 1.0
    assert set(out["results"]["image"]["per_label"]) == {"effusion", "normal", "device"}
    poolings = {row["pooling"]: row for row in out["pooling_study"]}
    assert poolings["spp:1,2,4"]["dim"] == 84 and poolings["gem:3"]["dim"] == 4
    assert all(0.0 <= row["recall_at_10_vs_full_s2"] <= 1.0 for row in poolings.values())
    assert out["near_duplicates"]["identity"]["recall_at_1"] == 1.0
    assert set(out["near_duplicates"]) >= {"resize_0.5", "crop_5pct", "rotate_3deg", "jpeg_q75", "bits_16_to_8"}
    classified = json.loads(run_cli(cli_env, "classify", str(manifest), "--label-column", "finding", "-k", "3",
                                    "--test-fraction", "0.5", "--json").stdout)
    assert classified["train"] + classified["test"] == 12 and set(classified["per_label"]) == {"effusion", "normal", "device"}
    found = json.loads(run_cli(cli_env, "search", str(files[0]), "-k", "3", "--json").stdout)
    votes = found["neighbour_labels"]
    assert set(votes) <= {"effusion", "normal", "device"} and votes and max(votes.values()) <= 1.0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| image |" in report and "Pooling study" in report and "Near-duplicates" in report
    assert (tmp_path / "report" / "precision_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "per_label.png").stat().st_size > 1000


def test_neighbour_label_votes_and_knn_classification() -> None:
    from retrieval.domain.evaluation import (
        knn_classification,
        neighbour_label_scores,
        split_by_study,
    )

    votes = neighbour_label_scores([frozenset({"x"}), frozenset({"x", "y"}), frozenset()], [0.9, 0.6, -0.2])
    assert votes == {"x": 1.0, "y": 0.4}  # y: 0.6 / (0.9 + 0.6); negative similarity carries no weight
    rng = np.random.default_rng(3)
    centres = {"x": np.array([1.0, 0, 0]), "y": np.array([0, 1.0, 0])}
    items, vectors = [], []
    for n in range(40):
        label = "x" if n % 2 else "y"
        items.append(EvalItem(n + 1, n + 1, frozenset({label})))
        vectors.append(centres[label] + 0.1 * rng.normal(size=3))
    matrix = np.array(vectors, np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    train, test = split_by_study(items, 0.25, seed=1)
    assert not set(train) & set(test) and len(test) == 10
    report = knn_classification(items, matrix, k=5, test_fraction=0.25, seed=1)
    assert report["per_label"]["x"]["auroc"] == 1.0 and report["per_label"]["x"]["accuracy"] == 1.0
    shuffled = knn_classification(items, rng.permutation(matrix), k=5, test_fraction=0.25, seed=1)
    assert shuffled["per_label"]["x"]["auroc"] < 0.9  # labels no longer follow the vectors
