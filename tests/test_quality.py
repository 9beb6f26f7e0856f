"""Reconstruction quality: the metrics, scoring at ingest, `retrieval quality`, filters and sort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from conftest import make_archive, synthetic_image, tiny_settings

from retrieval.ingest.pipeline import IngestPipeline
from retrieval.query.quality import psnr, reconstruction_quality, ssim
from retrieval.query.search import run_search
from retrieval.service import SpaceService


def test_psnr_and_ssim_behave() -> None:
    image = torch.from_numpy(synthetic_image(1, 64))[None]
    assert float(psnr(image, image)) == 100.0 and float(ssim(image, image)) == pytest.approx(1.0, abs=1e-5)
    noisy = (image + 0.05 * torch.randn_like(image, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    noisier = (image + 0.2 * torch.randn_like(image, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert 20 < float(psnr(image, noisy)) < 30  # sigma 0.05 -> about 26 dB
    assert float(psnr(image, noisier)) < float(psnr(image, noisy))
    assert float(ssim(image, noisier)) < float(ssim(image, noisy)) < 1.0
    values = reconstruction_quality(noisy.numpy(), image.numpy())
    assert values[0].shape == (1,) and values[1].shape == (1,)


def test_quality_at_ingest_filter_and_sort(tmp_path: Path) -> None:
    make_archive(tmp_path / "archive", studies=3, per_study=2)
    service = SpaceService(tiny_settings(tmp_path / "data", ingest_quality=True))
    report = IngestPipeline(service).run(tmp_path / "archive")
    assert report.ingested == 6 and report.seconds["quality"] > 0
    images = service.store.images_by_id(list(range(1, 7)))
    scores = sorted(image.recon_psnr for image in images.values())
    assert all(score is not None and 0 < score < 100 for score in scores)
    assert all(-1 <= image.recon_ssim <= 1 for image in images.values())
    threshold = scores[3]  # keeps the 3 best-reconstructed images
    kept = run_search(service, image_id=1, k=10, group_by="image", filter_pairs=[f"min_psnr={threshold}"])
    returned = [r["images"][0] for r in kept["results"]]
    assert returned and all(image["recon_psnr"] >= round(threshold, 2) for image in returned)
    assert len(returned) == sum(score >= threshold for score in scores)
    worst_first = run_search(service, image_id=1, k=6, group_by="image", sort="psnr")
    order = [r["images"][0]["recon_psnr"] for r in worst_first["results"]]
    assert order == sorted(order)
    service.close()


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)
def test_quality_command_scores_what_ingest_did_not(cli_env: dict[str, str], tmp_path: Path) -> None:
    make_archive(tmp_path / "archive", studies=2, per_study=2)
    run_cli(cli_env, "ingest", str(tmp_path / "archive"), "--no-progress")
    before = json.loads(run_cli(cli_env, "search", "--image-id", "1", "-k", "4", "--group-by", "image", "--json").stdout)
    assert all(r["images"][0]["recon_psnr"] is None for r in before["results"])
    assert "scored 4 images; 0 source files" in run_cli(cli_env, "quality").stdout
    after = json.loads(run_cli(cli_env, "search", "--image-id", "1", "-k", "4", "--group-by", "image", "--json",
                               "--sort", "ssim").stdout)
    ssims = [r["images"][0]["recon_ssim"] for r in after["results"]]
    assert all(value is not None for value in ssims) and ssims == sorted(ssims)
    assert "scored 0 images" in run_cli(cli_env, "quality").stdout  # nothing left to score
    assert np.isfinite([r["images"][0]["recon_psnr"] for r in after["results"]]).all()
