"""``retrieval verify-weights``: this project's pixel path and model against medvae's own, on the same files.

For each image, medvae's side is its training loader ``medvae.utils.loaders.load_2d_finetune``
(open, to tensor, bicubic antialiased ``Resize((384, 384))``, ``ScaleIntensity``, ``Normalize``)
and the model as medvae builds it (its classes, LoRA injected, no folding, medvae's attention),
posterior mode. Ours is the service's path: decode, ``to_model_input`` (preprocessing v2), the
production encoder (LoRA folded, fused attention) loaded from a checkpoint of medvae's module, so
the check means something with random weights too. Both run in fp32 PyTorch on the CPU in the
contiguous layout. Per image it reports the largest difference, relative to the reference's
largest magnitude, of z, of the stage-2 latent and of the final vector; an image passes when all
three are within :data:`TOLERANCE`. Known departures (a 16-bit PNG above 32767, which medvae's
loader wraps; colour images, which medvae feeds as RGB and we as luminance) are reported and not
counted. 2-D models only: the 3-D comparison (medvae's ``load_ct_3d`` / ``load_mri_3d``) is not
built yet.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.config import Settings
from retrieval.errors import InvalidRequestError
from retrieval.imaging.decode import decode_path
from retrieval.imaging.preprocess import preprocess_spec, to_model_input
from retrieval.model.encoder import MedVAEEncoder
from retrieval.model.network import save_state_dict
from retrieval.model.pooling import parse_pooling, pool

TOLERANCE = 1e-4
MEDVAE_INPUT_SIZE = 384  # load_2d_finetune resizes every image to 384 x 384


@dataclass
class ImageParity:
    source: str
    z: float
    s2: float
    vector: float
    departures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.departures) or max(self.z, self.s2, self.vector) <= TOLERANCE


def verify_weights(settings: Settings, images: list[Path]) -> dict[str, Any]:
    """Compare medvae's path and ours on ``images`` (2-D models); see the module docstring."""
    if settings.model.dims != 2:
        raise InvalidRequestError("verify-weights compares 2-D models for now; the 3-D comparison is not built yet",
                                  detail={"field": "model"})
    from medvae.utils.loaders import load_2d_finetune

    fixed = settings.replaced(input_size=MEDVAE_INPUT_SIZE, precision="fp32", runtime="torch", compile="off",
                              device="cpu")
    reference = MedVAEEncoder(fixed, fold=False, fused_attention=False, channels_last=False)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "medvae-module.ckpt"
        save_state_dict(reference.model, checkpoint)
        ours = MedVAEEncoder(fixed.replaced(weights=str(checkpoint), model_config_path=None), channels_last=False)
    spec, pooling = preprocess_spec(2, MEDVAE_INPUT_SIZE, "stretch"), parse_pooling(settings.model.pooling)
    channels = reference.architecture.in_channels
    rows = []
    for path in images:
        x = load_2d_finetune(str(path), merge_channels=True)[None].float()  # (1, 1, 384, 384) in [-1, 1]
        with torch.inference_mode():
            z_ref = reference.model.encode(x.expand(-1, channels, -1, -1).contiguous()).mode()
            s2_ref = reference.model.channel_proj(reference.model.channel_ds(z_ref) + z_ref)
        z = ours.encode(to_model_input(decode_path(path, max_pixels=settings.ingest.max_image_pixels), spec)[None])
        s2 = ours.s2_latent(z)
        rows.append(ImageParity(
            source=str(path), z=_relative(z, z_ref), s2=_relative(s2, s2_ref),
            vector=_relative(pool(s2, pooling), pool(s2_ref.float(), pooling)), departures=_departures(path, channels),
        ))
    return {
        "model": settings.model.name,
        "weights": reference.weights.identity,
        "tolerance": TOLERANCE,
        "input_size": MEDVAE_INPUT_SIZE,
        "images": [dict(asdict(row), passed=row.passed) for row in rows],
        "passed": all(row.passed for row in rows),
    }


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    scale = float(reference.abs().max()) or 1.0
    return float((ours.float() - reference).abs().max()) / scale


def _departures(path: Path, channels: int) -> list[str]:
    """What medvae's loader does differently with this file, by design (reported, not counted)."""
    with Image.open(path) as image:
        mode = image.mode
        high = int(np.asarray(image).max()) if mode.startswith("I") else 0
    found = []
    if mode.startswith("I") and high >= 32768:
        found.append("16-bit values above 32767: medvae's loader wraps them negative; we read unsigned integers")
    if mode not in ("L", "I", "I;16", "I;16B", "F", "1"):
        found.append(f"{mode} image: medvae averages its colour channels; we use luminance (ITU-R 601)")
    return found
