"""Relevance feedback (Rocchio), exclude_self and one hit per patient (issue 15, first part)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cli_runner import run_cli
from conftest import make_archive, synthetic_image, tiny_settings, write_png
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from retrieval.config import Settings
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.query.search import ROCCHIO, run_search, stored_vector
from retrieval.service import SpaceService
from retrieval.storage.orm import Latent


def _archive(settings: Settings, tmp_path: Path) -> SpaceService:
    make_archive(tmp_path / "archive", studies=4, per_study=2)
    service = SpaceService(settings)
    assert IngestPipeline(service).run(tmp_path / "archive").ingested == 8
    return service


def test_rocchio_moves_the_query_and_leaves_the_examples_out(settings: Settings, tmp_path: Path) -> None:
    service = _archive(settings, tmp_path)
    found = run_search(service, image_id=1, positive=(3,), negative=(5,), k=8, group_by="image")
    alpha, beta, gamma = ROCCHIO
    moved = alpha * stored_vector(service, 1) + beta * stored_vector(service, 3) - gamma * stored_vector(service, 5)
    moved /= np.linalg.norm(moved)
    ids = [r["images"][0]["image_id"] for r in found["results"]]
    assert 3 not in ids and 5 not in ids and len(ids) == 6  # the examples were seen: left out
    for result in found["results"]:  # every score is the cosine with the moved query
        expected = float(moved @ stored_vector(service, result["images"][0]["image_id"]))
        assert abs(result["score"] - expected) < 1e-5
    assert found["query"] == {"image_id": 1, "positive": [3], "negative": [5]}
    alone = run_search(service, positive=(3,), k=1, group_by="image")  # feedback without a query image
    assert alone["results"][0]["images"][0]["image_id"] == 4  # study_1's other image
    assert alone["query"]["source"] == "feedback"


def test_exclude_self_and_one_hit_per_patient(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "files"
    for i in range(4):
        write_png(root / f"f{i}.png", synthetic_image(200 + i))
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,study,patient_id\nfiles/f0.png,S1,P1\nfiles/f1.png,S2,P1\nfiles/f2.png,S3,P2\nfiles/f3.png,S4,\n")
    service = SpaceService(settings)
    IngestPipeline(service).run(manifest)
    with_self = run_search(service, image_id=1, k=10, group_by="image")
    assert with_self["results"][0]["images"][0]["image_id"] == 1
    without = run_search(service, image_id=1, k=10, group_by="image", exclude_self=True)
    assert 1 not in [r["images"][0]["image_id"] for r in without["results"]]
    patients = run_search(service, image_id=1, k=10, group_by="patient")
    assert len(patients["results"]) == 3  # P1 (two studies) once, P2, and the image without a patient id


def test_feedback_over_the_api_and_the_cli(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "data")
    _archive(settings, tmp_path).close()
    with TestClient(create_app(settings)) as client:
        body = client.post("/v1/search", json={"image_id": 1, "positive": [3], "negative": [5], "group_by": "image",
                                               "exclude_self": True, "k": 8}).json()
        ids = [r["images"][0]["image_id"] for r in body["results"]]
        assert {1, 3, 5}.isdisjoint(ids) and body["query"]["positive"] == [3]
        form = client.post("/v1/search", files={"positive": (None, "3,4"), "group_by": (None, "image")}).json()
        assert form["query"] == {"source": "feedback", "positive": [3, 4], "negative": []}
        reranked = client.post("/v1/search", json={"image_id": 2, "rerank": "latent", "rerank_depth": 5, "k": 8,
                                                   "group_by": "image"}).json()
        assert len(reranked["results"]) == 5 and reranked["rerank"] == "latent"  # nothing beyond the re-ranked depth
        assert client.post("/v1/search", json={"image_id": 2, "rerank": "pixels"}).status_code == 422
        missing = client.post("/v1/search", json={"positive": [999]})
        assert missing.status_code == 404 and "999" in missing.json()["error"]["message"]
    env = {"RETRIEVAL_DATA_DIR": str(tmp_path / "data"), "RETRIEVAL_WEIGHTS": "fake", "RETRIEVAL_INPUT_SIZE": "64",
           "RETRIEVAL_ID_SECRET": "test-secret-not-for-production"}
    cli = run_cli(env, "search", "--more-like", "3", "--less-like", "5", "--group-by", "image", "-k", "3", "--json")
    reranked = json.loads(run_cli(env, "search", "--image-id", "2", "--rerank", "latent", "--json").stdout)
    assert reranked["results"][0]["images"][0]["image_id"] == 2
    payload = json.loads(cli.stdout)
    assert payload["query"] == {"source": "feedback", "positive": [3], "negative": [5]} and len(payload["results"]) == 3


def test_rerank_with_the_stored_latents(settings: Settings, tmp_path: Path) -> None:
    """Issue 15: rerank=latent re-scores the ANN's top N with the cosine of the whole stage-2 latent."""
    import torch

    service = _archive(settings, tmp_path)
    reranked = run_search(service, image_id=2, k=8, group_by="image", rerank="latent")
    query = service.head_latent(torch.from_numpy(service.stored_latent(2))[None]).flatten()
    for result in reranked["results"]:
        image_id = result["images"][0]["image_id"]
        other = service.head_latent(torch.from_numpy(service.stored_latent(image_id))[None]).flatten()
        expected = float(torch.nn.functional.cosine_similarity(query, other, dim=0))
        assert abs(result["score"] - expected) < 2e-4  # the candidates' stage-2 latents are stored in float16, as z
    ids = [r["images"][0]["image_id"] for r in reranked["results"]]
    assert set(service.store.heads_of(ids, service.space.encoder_key)) == set(ids)  # read, not recomputed
    with service.store.engine.begin() as connection:  # rows ingested before heads were stored: computed from z
        connection.execute(update(Latent).values(head=None))
    again = run_search(service, image_id=2, k=8, group_by="image", rerank="latent")
    assert [r["images"][0]["image_id"] for r in again["results"]][:3] == ids[:3]
    assert all(abs(a["score"] - b["score"]) < 2e-4 for a, b in zip(again["results"], reranked["results"], strict=True))
    scores = [r["score"] for r in reranked["results"]]
    assert scores == sorted(scores, reverse=True) and reranked["results"][0]["images"][0]["image_id"] == 2
    plain = run_search(service, image_id=2, k=8, group_by="image")
    assert [r["score"] for r in plain["results"]] != scores  # pooled vs whole-latent scores
    only_feedback = run_search(service, positive=(3,), k=2, rerank="latent")
    assert any("needs a query image" in w for w in only_feedback["warnings"])
