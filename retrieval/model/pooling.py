"""Pure functions from a stage-2 latent ``(B, C, h, w)`` (or ``(B, C, d, h, w)``) to L2-normalised vectors ``(B, D)``.

A pooling is named by a spec string that is part of the embedding space's identity:

* ``mean``: global average per channel (D = C). Coarse: with the 4-channel latent, 4 numbers.
* ``spp:L1,L2,...``: spatial pyramid of average pools at LxL grids, concatenated
  (D = C * sum(L^2)); ``spp:1,2,4`` gives 84 values for medvae_8_4_2d. Default. For volumes the
  grids are LxLxL (D = C * sum(L^3); 73 values for the 1-channel 3-D models).
* ``grid:N``: the latent average-pooled to an NxN (NxNxN) grid and flattened (D = C * N^2 or N^3).
* ``gem:P``: generalized mean per channel, ``mean(|x|^P)^(1/P)`` carrying the sign of the
  channel mean (the latent is signed; classic GeM assumes ReLU features). D = C. P=1 is close to
  ``mean`` of magnitudes; large P approaches max-pooling.

* ``biomedclip``: not a pooling but BiomedCLIP's image tower on the stage-2 latent, exactly as MedVAE's
  stage-2 loss computes it (:mod:`retrieval.model.biomedclip`; D = 512, 2-D only). It needs the
  model, so :func:`pool` refuses it and the space's service computes it. In a space's identity it
  carries the weights it was made with: ``biomedclip[<BiomedCLIP weights identity>]``.

Every pooled vector is L2-normalised, so inner product = cosine similarity.

A spec may end in an archive-fitted transform, ``+center:<key>`` or ``+whiten:<key>``
(:mod:`retrieval.domain.whitening`): :func:`pool` ignores it; the space's service applies the
stored transform after pooling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retrieval.domain.whitening import METHODS
from retrieval.errors import ConfigurationError
from retrieval.model.clip_weights import CLIP_HEAD

CLIP_DIM = 512


@dataclass(frozen=True)
class PoolingSpec:
    """A parsed pooling spec: ``name`` and integer ``params``."""

    name: str
    params: tuple[int, ...] = ()
    transform: str | None = None  # "whiten:<key>" / "center:<key>": applied after pooling, by the service
    head_weights: str | None = None  # a model head's weights identity (biomedclip), as a space records it

    @property
    def canonical(self) -> str:
        base = self.name if not self.params else f"{self.name}:{','.join(str(p) for p in self.params)}"
        if self.head_weights:
            base += f"[{self.head_weights}]"
        return f"{base}+{self.transform}" if self.transform else base

    @property
    def is_model_head(self) -> bool:
        """True for a head that runs a model (``biomedclip``) rather than pooling the latent."""
        return self.name == CLIP_HEAD

    @property
    def transform_key(self) -> str | None:
        return self.transform.partition(":")[2] if self.transform else None

    @property
    def base(self) -> PoolingSpec:
        """The pooling without its transform."""
        return PoolingSpec(self.name, self.params, head_weights=self.head_weights)

    def with_transform(self, suffix: str) -> PoolingSpec:
        return PoolingSpec(self.name, self.params, suffix, self.head_weights)

    def with_head_weights(self, identity: str) -> PoolingSpec:
        return PoolingSpec(self.name, self.params, self.transform, identity)

    def dimension(self, channels: int, spatial_dims: int = 2) -> int:
        """Vector length for a latent with ``channels`` channels and 2 (images) or 3 (volumes) spatial axes."""
        if self.name == "mean":
            return channels
        if self.name == CLIP_HEAD:
            return CLIP_DIM
        if self.name == "spp":
            return channels * sum(level**spatial_dims for level in self.params)
        if self.name == "gem":
            return channels
        return channels * self.params[0] ** spatial_dims  # grid


def parse_pooling(spec: str) -> PoolingSpec:
    """Parse ``mean`` / ``spp:1,2,4`` / ``grid:8`` (optionally ``+whiten:<key>`` / ``+center:<key>``); raises
    :class:`ConfigurationError` naming the field."""
    spec, plus, transform = spec.strip().partition("+")
    if plus:
        method, _, key = transform.strip().partition(":")
        if method not in METHODS or not re.fullmatch(r"[0-9a-f]{12}", key):
            raise ConfigurationError(
                f"pooling transform {transform!r} is not `whiten:<12 hex>` or `center:<12 hex>` "
                "(`retrieval reindex --transform` fits one and prints it)", detail={"field": "pooling"})
        return parse_pooling(spec).with_transform(f"{method}:{key}")
    head = re.fullmatch(rf"{CLIP_HEAD}(?:\[([^\[\]]+)\])?", spec.strip())
    if head:
        return PoolingSpec(CLIP_HEAD, head_weights=head.group(1))
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
        f"pooling {spec!r} is not one of `mean`, `spp:L1,L2,...`, `grid:N`, `gem:P`, `{CLIP_HEAD}`",
        detail={"field": "pooling", "value": spec},
    )


def pool(s2: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """Pool a batch of stage-2 latents into L2-normalised float32 vectors ``(B, D)``."""
    s2 = s2.float()
    axes = tuple(range(2, s2.ndim))
    adaptive_pool = F.adaptive_avg_pool3d if s2.ndim == 5 else F.adaptive_avg_pool2d
    if spec.name == "mean":
        vectors = s2.mean(dim=axes)
    elif spec.name == "spp":
        parts = [adaptive_pool(s2, level).flatten(1) for level in spec.params]
        vectors = torch.cat(parts, dim=1)
    elif spec.name == "grid":
        vectors = adaptive_pool(s2, spec.params[0]).flatten(1)
    elif spec.name == "gem":
        p = float(spec.params[0])
        magnitude = s2.abs().clamp_min(1e-6).pow(p).mean(dim=axes).pow(1.0 / p)
        vectors = magnitude * torch.sign(s2.mean(dim=axes))
    else:  # a model head (biomedclip): the service runs it
        raise ConfigurationError(f"{spec.name!r} is a model head, not a pooling: SpaceService computes it")
    return F.normalize(vectors, p=2, dim=1, eps=1e-12)
