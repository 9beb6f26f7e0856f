"""Archive-fitted transforms of the vectors: centring and PCA-whitening as spaces of their own (issue 15)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from conftest import make_archive, synthetic_image, write_png
from fastapi.testclient import TestClient
from live_server import tiny_env

from api.main import create_app
from retrieval.config import Settings
from retrieval.domain.whitening import SHRINKAGE, fit_transform
from retrieval.errors import ConfigurationError
from retrieval.model.pooling import parse_pooling


def test_centring_and_whitening_are_what_they_say() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 12)) * np.linspace(3.0, 0.2, 12) + 4.0  # a shared mean, unequal variances
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    centred = fit_transform(vectors, "center")
    assert centred.matrix is None and np.allclose(centred.mean, vectors.mean(axis=0), atol=1e-6)
    whiten = fit_transform(vectors, "whiten")
    projected = (vectors - whiten.mean) @ whiten.matrix
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(vectors, rowvar=False)))[::-1]
    expected = eigenvalues / (eigenvalues + SHRINKAGE * eigenvalues.mean())  # unit variance, shrunk
    assert np.allclose(np.var(projected, axis=0, ddof=1), expected, atol=1e-4)
    assert np.allclose(np.cov(projected, rowvar=False), np.diag(expected), atol=1e-4)  # decorrelated
    out = whiten.apply(vectors)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert (vectors @ vectors.T).mean() > 0.8 and abs(float((out @ out.T).mean())) < 0.05  # no more piling up
    assert fit_transform(vectors, "whiten").key == whiten.key != centred.key  # content-addressed, deterministic
    with pytest.raises(ValueError, match="not one of center, whiten"):
        fit_transform(vectors, "centre")
    assert parse_pooling(f"spp:4,1,2+{whiten.suffix}").canonical == f"spp:1,2,4+whiten:{whiten.key}"
    with pytest.raises(ConfigurationError, match="not `whiten:<12 hex>`"):
        parse_pooling("spp:1,2,4+whitened:abc")


def test_reindex_transform_makes_a_space_searched_from_cli_api_and_as_default(tmp_path: Path) -> None:
    files = make_archive(tmp_path / "archive", studies=5, per_study=3)
    env = tiny_env(tmp_path / "data")
    run_cli(env, "ingest", str(tmp_path / "archive"), "--no-progress")
    typo = run_cli(env, "reindex", "--transform", "whitening", check=False)
    assert typo.returncode != 0 and "not one of center, whiten" in typo.stderr
    fitted = run_cli(env, "reindex", "--transform", "whiten")
    pooling = re.search(r"RETRIEVAL_POOLING=(\S+)", fitted.stdout).group(1)  # type: ignore[union-attr]
    key = re.search(r"--space ([0-9a-f]{12})", fitted.stdout).group(1)  # type: ignore[union-attr]
    assert pooling.startswith("spp:1,2,4+whiten:") and "15 vectors derived" in fitted.stdout
    again = run_cli(env, "reindex", "--transform", "whiten")  # same vectors, same fit: the same space
    assert f"--space {key}" in again.stdout

    def search(*extra: str, environment: dict[str, str] = env) -> dict:
        return json.loads(run_cli(environment, "search", str(files[0]), "-k", "6", "--group-by", "image", "--json",
                                  *extra).stdout)

    plain, whitened = search(), search("--space", key)
    assert whitened["space"]["pooling"] == pooling and whitened["space"]["key"].startswith(key)
    plain_scores = [r["score"] for r in plain["results"]]
    white_scores = [r["score"] for r in whitened["results"]]
    assert white_scores[0] == pytest.approx(1.0, abs=1e-4)  # the query image itself
    # same study first (the fake encoder's studies), then the rest: whitening widens the gap between them
    assert plain_scores[2] - plain_scores[3] < 0.35 < white_scores[2] - white_scores[3] and min(white_scores) < 0
    as_default = search(environment={**env, "RETRIEVAL_POOLING": pooling})
    assert as_default["space"]["key"] == whitened["space"]["key"] and as_default["results"] == whitened["results"]

    # new images into the whitened space are transformed with the stored fit
    extra = write_png(tmp_path / "new" / "x.png", synthetic_image(99, size=64))
    run_cli({**env, "RETRIEVAL_POOLING": pooling}, "ingest", str(extra.parent), "--no-progress")
    found = json.loads(run_cli({**env, "RETRIEVAL_POOLING": pooling}, "search", str(extra), "-k", "1", "--json").stdout)
    assert found["results"][0]["images"][0]["source"].endswith("x.png")

    unknown = run_cli({**env, "RETRIEVAL_POOLING": "spp:1,2,4+whiten:0123456789ab"}, "search", str(files[0]),
                      check=False)
    assert unknown.returncode != 0 and "no fitted transform 0123456789ab" in unknown.stderr

    settings = Settings(data_dir=tmp_path / "data", weights="fake", input_size=64, decode_workers=0,
                        id_secret="test-secret-not-for-production", runtime="torch")
    with TestClient(create_app(settings)) as client:
        spaces = {space["pooling"]: space for space in client.get("/v1/spaces").json()}
        assert spaces[pooling]["images"] == 16 and not spaces[pooling]["active"]
        body = client.post("/v1/search", json={"image_id": 1, "k": 6, "group_by": "image", "space": key}).json()
        assert body["space"]["pooling"] == pooling and body["results"][0]["images"][0]["image_id"] == 1
        assert body["results"][-1]["score"] < 0.5  # other studies no longer score near 1
