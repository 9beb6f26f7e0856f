"""The encoder contract that the service, ingest and query code rely on (real MedVAE or the fake).

Pixels in ``[0, 1]`` go through three steps: **pre** (:meth:`Encoder.to_model_input`: scale to
``[-1, 1]``, channels, device, layout), **core** (:meth:`Encoder.encode_core`: the network's
posterior mode) and **post** (float32, contiguous, on the CPU); :meth:`Encoder.encode` runs all
three. z has shape ``(B, latent_channels, S/downsample, ...)``; :meth:`Encoder.s2_latent` maps it to
the stage-2 latent the pooling heads read; :meth:`Encoder.decode` maps it back to pixels.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from retrieval.domain.architectures import Architecture
from retrieval.model.weights import WeightsSource


class Encoder(Protocol):
    """What :class:`retrieval.model.encoder.MedVAEEncoder` and :class:`retrieval.model.fake.FakeEncoder` provide."""

    architecture: Architecture
    weights: WeightsSource
    device: torch.device
    openvino: Any
    compiled: bool
    compile_cache: str | None  # when compiled was asked for: cold, warm or unusable (decision 34); else None

    @property
    def dims(self) -> int: ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def downsample(self) -> int: ...

    @property
    def precision_label(self) -> str: ...

    def to_model_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def encode_core(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def s2_latent(self, z: torch.Tensor, *, fast: bool = False) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> np.ndarray: ...
