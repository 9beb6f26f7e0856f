"""Reconstruction quality as a signal: PSNR and SSIM of decode(z) against the normalised input.

An image the autoencoder represents poorly (out of its training distribution: wrong modality,
heavy artefacts, a photo of a screen) reconstructs badly; low PSNR / SSIM flags it. Both are
computed on the ``(S, S)`` model input in [0, 1] (after resize and padding), data range 1.
SSIM uses the usual 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03.

Cost: one decoder pass per image, about 2.3x the encoder's FLOPs, so ingest with quality
scoring takes about 3.3x the encode time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from retrieval.service import SpaceService


def psnr(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` in [0, 1] -> ``(B,)`` PSNR in dB (capped at 100 for identical images)."""
    mse = (reference - test).pow(2).mean(dim=(1, 2))
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` in [0, 1] -> ``(B,)`` mean structural similarity."""
    window = _gaussian_window()
    x, y = reference[:, None].float(), test[:, None].float()
    pad = window.shape[-1] // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=(1, 2, 3))


def reconstruction_quality(decoded: np.ndarray | torch.Tensor, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(B, S, S)`` reconstructions and inputs in [0, 1] -> (PSNR dB, SSIM) arrays of length B."""
    a = torch.as_tensor(pixels, dtype=torch.float32).cpu()  # inputs fitted on a GPU are tensors there
    b = torch.as_tensor(decoded, dtype=torch.float32).cpu()
    return psnr(a, b).numpy(), ssim(a, b).numpy()


def score_latents(service: SpaceService, z: np.ndarray | torch.Tensor, pixels: np.ndarray | torch.Tensor) -> list[tuple[float, float]]:
    """Decode a batch of z and score it against its ``(B, S, S)`` inputs: ``[(PSNR dB, SSIM), ...]``."""
    psnr_db, ssim_value = reconstruction_quality(service.encoder.decode(z), pixels)
    return [(float(p), float(s)) for p, s in zip(psnr_db, ssim_value, strict=True)]


def score_stored(service: SpaceService, *, limit: int, batch: int = 16) -> tuple[int, int]:
    """Score stored images that have no quality yet, re-reading their source files.

    Returns ``(scored, unreadable sources)``; images whose source is gone keep no score.
    """
    from retrieval.errors import RetrievalError
    from retrieval.imaging.decode import decode_path
    from retrieval.storage.quality import images_without_quality, set_quality

    images = images_without_quality(service.store, limit)
    scored, unreadable = 0, 0
    for start in range(0, len(images), batch):
        ids, pixels, latents = [], [], []
        for image in images[start : start + batch]:
            z = service.store.latent(image.id, service.space.encoder_key)
            try:
                decoded = decode_path(image.source_uri, max_pixels=service.settings.ingest.max_image_pixels)
            except (RetrievalError, OSError):
                unreadable += 1
                continue
            if z is None:
                continue
            ids.append(image.id)
            pixels.append(service.model_input(decoded))
            latents.append(z)
        if ids:
            scores = score_latents(service, np.stack(latents), np.stack(pixels))
            set_quality(service.store, [(i, p, s) for i, (p, s) in zip(ids, scores, strict=True)])
            scored += len(ids)
    return scored, unreadable
