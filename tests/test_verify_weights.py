"""`retrieval verify-weights`: medvae's own loader and module beside ours (issue 13, parity command)."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("model", ["medvae_8_4_2d", "medvae_4_3_2d", "medvae_4_1_2d", "medvae_8_1_2d"])
def test_random_weights_match_medvae_on_square_and_non_square_images(model: str, tmp_path: Path) -> None:
    images = [_png(tmp_path / "square.png", 300, 300, 1), _png(tmp_path / "wide.png", 512, 640, 2)]
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
    named = run_cli(env, "verify-weights", str(sixteen))
    assert "known departure (not counted): 16-bit values above 32767" in named.stdout
    real_stretch = verify.to_model_input  # the letterbox (preprocessing v1's shape) must be caught
    monkeypatch.setattr(verify, "to_model_input",
                        lambda decoded, spec: real_stretch(decoded, verify.preprocess_spec(2, 384, "letterbox")))
    differs = run_cli(env, "verify-weights", str(wide), check=False)
    assert differs.returncode == 1 and "DIFFERS" in differs.stdout and "parity does NOT hold" in differs.stdout
