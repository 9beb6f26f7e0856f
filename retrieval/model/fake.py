"""A deterministic fake encoder with MedVAE's contract, for fast tests (``weights=fake``).

It is **not** MedVAE and never a fallback: it runs only when ``weights=fake`` is set, and every
output then says so (``"weights": "fake-encoder"``, the CLI warning, the page banner), as random
weights do. It keeps what the rest of the system relies on:

* the same latent shape as the configured architecture: ``(B, C, S/f, S/f[, S/f])`` with the
  model's latent channels ``C`` and downsampling ``f``;
* the same pre / core / post interface: :meth:`to_model_input` (pixels in ``[0, 1]`` to ``[-1, 1]``),
  :meth:`encode_core` (model input to z), :meth:`encode` (both, float32 on the CPU);
* determinism (bitwise), a stage-2 latent of z's shape (:meth:`s2_latent`) and a decoder back to
  pixels in ``[0, 1]`` (:meth:`decode`) that reconstructs a blurred image, so PSNR/SSIM, previews
  and similarity maps have real content.

z is a fixed function of the image: channel 0 is the mean of each ``f x f`` cell (so decode is
its upsampling), the others are that grid's gradients and local contrast. Similar images get
similar vectors, which is all the search, grouping and filter tests need; the cost is a few
pooling operations instead of a 600-GFLOP network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.config import Settings
from retrieval.domain.architectures import Architecture, get_architecture
from retrieval.model.weights import WeightsSource, resolve_weights


class FakeEncoder:
    """Pools and differences instead of MedVAE's network; same shapes, same interface."""

    precision_label = "fake"
    openvino = None
    compiled = False
    compile_cache = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.architecture: Architecture = get_architecture(settings.model.name)
        self.weights: WeightsSource = resolve_weights(settings, self.architecture)
        self.device = torch.device("cpu")

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.architecture.dims

    @property
    def latent_channels(self) -> int:
        return self.architecture.embed_dim

    @property
    def downsample(self) -> int:
        return self.architecture.downsample

    def to_model_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, S, S[, S])`` in [0, 1] -> ``(B, 1, S, S[, S])`` in [-1, 1] (the pre step)."""
        tensor = torch.as_tensor(pixels, dtype=torch.float32)
        if tensor.ndim != self.dims + 1:
            shape = "(B, S, S)" if self.dims == 2 else "(B, S, S, S)"
            raise ValueError(f"expected {shape} pixels for {self.architecture.name}, got shape {tuple(tensor.shape)}")
        return tensor.mul(2.0).sub(1.0).unsqueeze(1)

    def encode_core(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> z ``(B, C, S/f, ...)``: cell means, their gradients and local contrast (the core step)."""
        pool = F.avg_pool3d if self.dims == 3 else F.avg_pool2d
        mean = pool(x, self.downsample)
        contrast = (pool(x * x, self.downsample) - mean * mean).clamp_min(0.0).sqrt()
        features = [mean]
        for axis in range(2, 2 + self.dims):
            features.append(torch.diff(mean, dim=axis, append=mean.narrow(axis, mean.shape[axis] - 1, 1)))
        features.append(contrast)
        channels = [features[i % len(features)] for i in range(self.latent_channels)]
        return torch.cat(channels, dim=1).contiguous()

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Deterministic z, float32 on the CPU, for a batch of normalised images (pre, core, post)."""
        return self.encode_core(self.to_model_input(pixels)).float().contiguous()

    @torch.inference_mode()
    def s2_latent(self, z: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
        """A stage-2 latent of z's shape: z mixed with its channel mean (MedVAE's ``channel_proj(channel_ds(z) + z)``
        is likewise a cheap per-position map). ``fast`` changes nothing here."""
        z = torch.as_tensor(z, dtype=torch.float32)
        return (z + z.mean(dim=1, keepdim=True)).float()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Pixels ``(B, S, S[, S])`` in [0, 1]: channel 0 (the cell means) upsampled."""
        z = torch.as_tensor(z, dtype=torch.float32)
        mode = "trilinear" if self.dims == 3 else "bilinear"
        up = F.interpolate(z[:, :1], scale_factor=self.downsample, mode=mode, align_corners=False)
        return up[:, 0].add(1.0).div(2.0).clamp(0.0, 1.0).numpy()
