"""`retrieval verify-weights`: medvae's own loader and module beside ours (issue 13, parity command)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_runner import run_cli
from conftest import synthetic_image
from live_server import tiny_env
from PIL import Image


def _png(path: Path, height: int, width: int, seed: int) -> Path:
    square = synthetic_image(seed, size=max(height, width))
    Image.fromarray((square[:height, :width] * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("model", "shapes"), [
    ("medvae_8_4_2d", [(300, 300)]),  # each model on one shape: the model does not change the pixel path, and
    ("medvae_4_3_2d", [(512, 640)]),  # the shape does not change the model; the two non-square shapes that a
    ("medvae_4_1_2d", [(640, 512)]),  # wrong fit would break (wide and tall) on two models, a square one on two
    ("medvae_8_1_2d", [(300, 300)]),
])
def test_random_weights_match_medvae_on_square_and_non_square_images(
    model: str, shapes: list[tuple[int, int]], tmp_path: Path
) -> None:
    images = [_png(tmp_path / f"{h}x{w}.png", h, w, seed) for seed, (h, w) in enumerate(shapes, start=1)]
    env = tiny_env(tmp_path / "data", RETRIEVAL_WEIGHTS="random", RETRIEVAL_MODEL=model)
    result = run_cli(env, "verify-weights", *map(str, images), "--json")
    report = json.loads(result.stdout)
    assert report["passed"] and report["input_size"] == 384
    for row in report["images"]:
        assert row["departures"] == [] and max(row["z"], row["s2"], row["vector"]) <= 1e-4, row


def test_a_real_difference_fails_and_known_departures_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval.ops.verify as verify

    wide = _png(tmp_path / "wide.png", 200, 400, 3)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray((synthetic_image(4, size=96) * 65535).astype(np.uint16)).save(sixteen)
    env = tiny_env(tmp_path / "data", RETRIEVAL_WEIGHTS="random", RETRIEVAL_MODEL="medvae_8_1_2d")
    real_stretch = verify.to_model_input  # the letterbox (preprocessing v1's shape) must be caught
    monkeypatch.setattr(verify, "to_model_input",
                        lambda decoded, spec: real_stretch(decoded, verify.preprocess_spec(2, 384, "letterbox")))
    differs = run_cli(env, "verify-weights", str(sixteen), str(wide), check=False)
    assert "known departure (not counted): 16-bit values above 32767" in differs.stdout
    assert differs.returncode == 1 and "parity does NOT hold" in differs.stdout
    verdicts = [line.split()[0] for line in differs.stdout.splitlines() if line.rstrip().endswith(".png")]
    assert verdicts == ["known", "DIFFERS"], differs.stdout


@pytest.mark.parametrize("model", ["medvae_4_1_3d", "medvae_8_1_3d"])
def test_random_3d_weights_match_medvae_on_ct_and_mr_volumes(model: str, tmp_path: Path) -> None:
    """medvae's load_ct_3d / load_mri_3d + sliding window beside fit_volume + our encoder: the same input, the same z."""
    from retrieval.ops.sample import synthetic_volume

    volumes = []
    for name, modality, shape in (("ct.nii.gz", "CT", (40, 35, 20)), ("mr.nii.gz", "MR", (30, 37, 18))):
        volumes.append(tmp_path / name)
        nib.save(nib.Nifti1Image(synthetic_volume(modality, shape), np.diag([0.8, 0.8, 2.0, 1.0])), str(volumes[-1]))
    env = tiny_env(tmp_path / "data", RETRIEVAL_WEIGHTS="random", RETRIEVAL_MODEL=model)
    report = json.loads(run_cli(env, "verify-weights", *map(str, volumes), "--json").stdout)
    assert report["passed"] and report["window"] == 160
    assert [("load_ct_3d" in row["source"], "load_mri_3d" in row["source"]) for row in report["images"]] == [
        (True, False), (False, True)]
    for row in report["images"]:
        assert row["departures"] == [] and row["model_input"] == 0.0 and row["s2"] is None, row
        assert max(row["z"], row["vector"]) <= 1e-4, row
    budget = run_cli({**env, "RETRIEVAL_VOLUME_MAX_VOXELS": "4096"}, "verify-weights", str(volumes[0]))
    assert "exceed RETRIEVAL_VOLUME_MAX_VOXELS" in budget.stdout and "not compared" in budget.stdout
