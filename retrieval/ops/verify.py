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
counted.

For a 3-D model the files are NIfTI volumes. medvae's side is ``load_ct_3d`` or ``load_mri_3d`` (by
the volume's modality: RAS, CT window or MR min-max, ``CropForeground(k_divisible=16)``) and its
``_process_3d`` sliding window (windows of at most 160 voxels a side, Gaussian blending), posterior
mode; ours is :func:`~retrieval.imaging.preprocess.fit_volume` and our encoder with 160-voxel windows.
It compares the model input, z and the vector (a volume's vector pools z; there is no stage-2 latent).
Where the two cannot be compared (a volume over ``RETRIEVAL_VOLUME_MAX_VOXELS``, which we downsample
and medvae does not; a side over 160 voxels, where the windows differ) it says so instead.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.config import Settings
from retrieval.domain.items import SourceItem
from retrieval.imaging.decode import decode_path
from retrieval.imaging.preprocess import fit_volume, preprocess_spec, to_model_input
from retrieval.imaging.volumes import load_volume
from retrieval.model.encoder import MedVAEEncoder
from retrieval.model.network import save_state_dict
from retrieval.model.pooling import parse_pooling, pool

TOLERANCE = 1e-4
MEDVAE_INPUT_SIZE = 384  # load_2d_finetune resizes every image to 384 x 384
MEDVAE_GPU_DIM = 160  # medvae's MVAE(gpu_dim=160): the largest window side of its 3-D sliding window


@dataclass
class ImageParity:
    """One file's comparison; a quantity that could not be compared is ``None`` (its departure says why)."""

    source: str
    z: float | None
    s2: float | None
    vector: float | None
    model_input: float | None = None  # 3-D: our fitted volume against medvae's loader output
    departures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        compared = [value for value in (self.z, self.s2, self.vector, self.model_input) if value is not None]
        return bool(self.departures) or all(value <= TOLERANCE for value in compared)


def verify_weights(settings: Settings, paths: list[Path]) -> dict[str, Any]:
    """Compare medvae's path and ours on ``paths`` (images, or NIfTI volumes for a 3-D model); see the module docstring."""
    if settings.model.dims == 3:
        fixed = settings.replaced(precision="fp32", runtime="torch", compile="off", device="cpu",
                                  volume_roi=MEDVAE_GPU_DIM)
        reference, ours = _reference_and_ours(fixed)
        rows = [_compare_volume(settings, reference, ours, path) for path in paths]
        extra: dict[str, Any] = {"volume_max_voxels": settings.model.volume_max_voxels, "window": MEDVAE_GPU_DIM}
    else:
        fixed = settings.replaced(input_size=MEDVAE_INPUT_SIZE, precision="fp32", runtime="torch", compile="off",
                                  device="cpu")
        reference, ours = _reference_and_ours(fixed)
        rows = [_compare_image(settings, reference, ours, path) for path in paths]
        extra = {"input_size": MEDVAE_INPUT_SIZE}
    return {
        "model": settings.model.name,
        "weights": reference.weights.identity,
        "tolerance": TOLERANCE,
        **extra,
        "images": [dict(asdict(row), passed=row.passed) for row in rows],
        "passed": all(row.passed for row in rows),
    }


def _reference_and_ours(fixed: Settings) -> tuple[MedVAEEncoder, MedVAEEncoder]:
    """medvae's module as medvae builds it (no LoRA folding, its own attention) and ours, loaded from a
    checkpoint of the former, both fp32 and contiguous on the CPU."""
    reference = MedVAEEncoder(fixed, fold=False, fused_attention=False, channels_last=False)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "medvae-module.ckpt"
        save_state_dict(reference.model, checkpoint)
        ours = MedVAEEncoder(fixed.replaced(weights=str(checkpoint), model_config_path=None), channels_last=False)
    return reference, ours


def _compare_image(settings: Settings, reference: MedVAEEncoder, ours: MedVAEEncoder, path: Path) -> ImageParity:
    from medvae.utils.loaders import load_2d_finetune

    spec, pooling = preprocess_spec(2, MEDVAE_INPUT_SIZE, "stretch"), parse_pooling(settings.model.pooling)
    channels = reference.architecture.in_channels
    x = load_2d_finetune(str(path), merge_channels=True)[None].float()  # (1, 1, 384, 384) in [-1, 1]
    with torch.inference_mode():
        z_ref = reference.model.encode(x.expand(-1, channels, -1, -1).contiguous()).mode()
        s2_ref = reference.model.channel_proj(reference.model.channel_ds(z_ref) + z_ref)
    z = ours.encode(to_model_input(decode_path(path, max_pixels=settings.ingest.max_image_pixels), spec)[None])
    s2 = ours.s2_latent(z)
    return ImageParity(
        source=str(path), z=_relative(z, z_ref), s2=_relative(s2, s2_ref),
        vector=_relative(pool(s2, pooling), pool(s2_ref.float(), pooling)), departures=_departures(path, channels),
    )


def _compare_volume(settings: Settings, reference: MedVAEEncoder, ours: MedVAEEncoder, path: Path) -> ImageParity:
    """medvae's ``load_ct_3d`` / ``load_mri_3d`` (by the volume's modality) and ``_process_3d``'s sliding
    window (posterior mode) against :func:`fit_volume` and our encoder."""
    from medvae.utils.extras import roi_size_calc
    from medvae.utils.loaders import load_ct_3d, load_mri_3d
    from monai.inferers import sliding_window_inference

    volume = load_volume(SourceItem(path=str(path)), max_voxels=settings.ingest.max_image_pixels)
    loader = load_ct_3d if volume.modality == "CT" else load_mri_3d
    with warnings.catch_warnings():  # MONAI's deprecation and optional-codec notices are not ours to act on
        warnings.simplefilter("ignore")
        logging.getLogger("monai").setLevel(logging.ERROR)
        x_ref = loader(str(path))[None].float()  # (1, 1, X, Y, Z) in [-1, 1], foreground-cropped
    fitted = fit_volume(volume, max_voxels=settings.model.volume_max_voxels)
    source = f"{path} ({volume.modality}, {loader.__name__})"
    if tuple(fitted.voxels.shape) != tuple(x_ref.shape[2:]):
        return ImageParity(source=source, z=None, s2=None, vector=None, departures=[
            (f"{tuple(x_ref.shape[2:])} voxels after the crop exceed RETRIEVAL_VOLUME_MAX_VOXELS "
            f"({settings.model.volume_max_voxels}): ours is downsampled to {tuple(fitted.voxels.shape)}, medvae "
            "encodes native resolution; not compared (raise the budget to compare)")])
    model_input = _relative(torch.from_numpy(fitted.voxels) * 2.0 - 1.0, x_ref[0, 0])
    roi = roi_size_calc(list(x_ref.shape[-3:]), target_gpu_dim=MEDVAE_GPU_DIM)
    if list(roi) != list(x_ref.shape[-3:]):
        return ImageParity(source=source, z=None, s2=None, vector=None, model_input=model_input, departures=[
            (f"a side above {MEDVAE_GPU_DIM} voxels: medvae slides windows of {roi}, ours cubes of "
            f"{MEDVAE_GPU_DIM}; z blends differently and is not compared")])
    channels = reference.architecture.in_channels
    with torch.inference_mode():
        z_ref = sliding_window_inference(
            x_ref.expand(-1, channels, -1, -1, -1).contiguous(), roi_size=roi, sw_batch_size=1, mode="gaussian",
            predictor=lambda patch: reference.model.encode(patch).mode(),
        )
    z = ours.encode(fitted.voxels[None])
    pooling = parse_pooling(settings.model.pooling)
    return ImageParity(source=source, z=_relative(z, z_ref), s2=None, model_input=model_input,
                       vector=_relative(pool(z, pooling), pool(z_ref.float(), pooling)))


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
