"""Key/shape manifests of every supported MedVAE checkpoint, shipped as ``retrieval/model/manifests/<model>.json``.

Each manifest lists the state-dict keys and shapes of the module ``medvae`` builds for the model
(LoRA injected where medvae injects it) and the sizes of the hub files it mirrors, so a wrong
architecture fails a test offline (``tests/test_checkpoint_manifests.py``), long before a
download. Regenerate after a deliberate architecture change, and check the sizes against the hub:

    python -m retrieval.ops.checkpoint_manifests
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from retrieval.domain.architectures import ARCHITECTURES, Architecture
from retrieval.model.network import build_medvae_model

MANIFEST_DIR = Path(__file__).resolve().parents[1] / "model" / "manifests"

HUB_CHECKPOINT_MB = {  # model_weights/*.ckpt on stanfordmimi/MedVAE, as measured by the issue 13 audit
    "medvae_4_1_2d": 221, "medvae_8_1_2d": 335, "medvae_4_3_2d": 224, "medvae_8_4_2d": 338,
    "medvae_4_1_3d": 644, "medvae_8_1_3d": 984,
}

logger = logging.getLogger(__name__)


def state_shapes(architecture: Architecture) -> dict[str, list[int]]:
    """Keys and shapes of the module medvae builds for ``architecture`` (on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_medvae_model(architecture, architecture.ddconfig, architecture.embed_dim)
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def manifest(architecture: Architecture) -> dict[str, Any]:
    shapes = state_shapes(architecture)
    return {
        "model": architecture.name,
        "hub_checkpoint": architecture.hub_checkpoint,
        "hub_checkpoint_mb": HUB_CHECKPOINT_MB[architecture.name],
        "fp32_bytes": sum(4 * _count(shape) for shape in shapes.values()),
        "keys": shapes,
    }


def _count(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def main() -> None:
    MANIFEST_DIR.mkdir(parents=True, exist_ok=True)
    for architecture in ARCHITECTURES.values():
        path = MANIFEST_DIR / f"{architecture.name}.json"
        path.write_text(json.dumps(manifest(architecture), indent=1, sort_keys=True) + "\n")
        logger.warning("wrote %s", path)


if __name__ == "__main__":
    main()
