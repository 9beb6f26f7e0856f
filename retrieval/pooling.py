"""Pure functions from a stage-2 latent ``(B, C, h, w)`` to L2-normalised vectors ``(B, D)``.

A pooling is named by a spec string that is part of the embedding space's identity:

* ``mean``: global average per channel (D = C). Coarse: with the 4-channel latent, 4 numbers.
* ``spp:L1,L2,...``: spatial pyramid of average pools at LxL grids, concatenated
  (D = C * sum(L^2)); ``spp:1,2,4`` gives 84 values for medvae_8_4_2d. Default.
* ``grid:N``: the latent average-pooled to an NxN grid and flattened (D = C * N^2).
* ``gem:P``: generalized mean per channel, ``mean(|x|^P)^(1/P)`` carrying the sign of the
  channel mean (the latent is signed; classic GeM assumes ReLU features). D = C. P=1 is close to
  ``mean`` of magnitudes; large P approaches max-pooling.

Every pooled vector is L2-normalised, so inner product = cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retrieval.errors import ConfigurationError


@dataclass(frozen=True)
class PoolingSpec:
    """A parsed pooling spec: ``name`` and integer ``params``."""

    name: str
    params: tuple[int, ...] = ()

    @property
    def canonical(self) -> str:
        return self.name if not self.params else f"{self.name}:{','.join(str(p) for p in self.params)}"

    def dimension(self, channels: int) -> int:
        """Vector length for a latent with ``channels`` channels."""
        if self.name == "mean":
            return channels
        if self.name == "spp":
            return channels * sum(level * level for level in self.params)
        if self.name == "gem":
            return channels
        return channels * self.params[0] ** 2  # grid


def parse_pooling(spec: str) -> PoolingSpec:
    """Parse ``mean`` / ``spp:1,2,4`` / ``grid:8``; raises :class:`ConfigurationError` naming the field."""
    name, _, raw = spec.strip().partition(":")
    try:
        params = tuple(int(p) for p in raw.split(",") if p.strip()) if raw else ()
    except ValueError:
        raise ConfigurationError(f"pooling {spec!r}: parameters must be integers", detail={"field": "pooling"}) from None
    if name == "mean" and not params:
        return PoolingSpec("mean")
    if name == "spp" and params and all(p >= 1 for p in params):
        return PoolingSpec("spp", tuple(sorted(set(params))))
    if name == "grid" and len(params) == 1 and params[0] >= 1:
        return PoolingSpec("grid", params)
    if name == "gem" and len(params) == 1 and 1 <= params[0] <= 32:
        return PoolingSpec("gem", params)
    raise ConfigurationError(
        f"pooling {spec!r} is not one of `mean`, `spp:L1,L2,...`, `grid:N`, `gem:P`",
        detail={"field": "pooling", "value": spec},
    )


def pool(s2: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """Pool a batch of stage-2 latents into L2-normalised float32 vectors ``(B, D)``."""
    s2 = s2.float()
    if spec.name == "mean":
        vectors = s2.mean(dim=(2, 3))
    elif spec.name == "spp":
        parts = [F.adaptive_avg_pool2d(s2, level).flatten(1) for level in spec.params]
        vectors = torch.cat(parts, dim=1)
    elif spec.name == "grid":
        vectors = F.adaptive_avg_pool2d(s2, spec.params[0]).flatten(1)
    elif spec.name == "gem":
        p = float(spec.params[0])
        magnitude = s2.abs().clamp_min(1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        vectors = magnitude * torch.sign(s2.mean(dim=(2, 3)))
    else:  # parse_pooling never produces anything else
        raise ConfigurationError(f"unknown pooling {spec.name!r}")
    return F.normalize(vectors, p=2, dim=1, eps=1e-12)
