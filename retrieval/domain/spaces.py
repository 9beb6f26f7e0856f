"""Embedding-space identity (design decision 4).

A space = (model, weights identity, input size, preprocessing version, pooling spec, dimension).
Its ``key`` is the sha256 of that tuple's canonical JSON; the ``encoder_key`` covers only what
determines z (model, weights, input size, preprocessing), so spaces that differ only in pooling
share stored latents and a new pooling is a re-index, not a re-encode.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PreprocessSpec:
    """How a space turns decoded pixels into model input: 2-D square or 3-D cube of ``input_size``,
    by the pixel path of ``version`` (``retrieval.imaging.preprocess``)."""

    dims: int
    input_size: int
    version: str


@dataclass(frozen=True)
class SpaceIdentity:
    model: str
    weights: str
    input_size: int
    preprocessing: str
    pooling: str
    dim: int

    @property
    def encoder_key(self) -> str:
        return _digest(
            {"model": self.model, "weights": self.weights, "input_size": self.input_size, "preprocessing": self.preprocessing}
        )

    @property
    def key(self) -> str:
        return _digest(asdict(self))

    def with_pooling(self, pooling: str, dim: int) -> SpaceIdentity:
        return SpaceIdentity(self.model, self.weights, self.input_size, self.preprocessing, pooling, dim)


def _digest(payload: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
