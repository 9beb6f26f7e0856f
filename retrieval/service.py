"""Wiring: settings -> store, encoder, embedding space and its index, shared by the CLI and the API.

The encoder and the index are loaded lazily on first use, under a lock (loading MedVAE takes
seconds; ``doctor`` and metadata reads do not need it).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from retrieval.encoder import MedVAEEncoder
from retrieval.imaging import PREPROCESSING_VERSION
from retrieval.index import OpenReport, SpaceIndex
from retrieval.models import Space
from retrieval.pooling import PoolingSpec, parse_pooling, pool
from retrieval.settings import Settings
from retrieval.spaces import SpaceIdentity
from retrieval.store import Store
from retrieval.weights import RANDOM_WEIGHTS_LABEL

logger = logging.getLogger(__name__)


class RetrievalService:
    """One archive: its database, its encoder and the index of the configured space."""

    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.pooling: PoolingSpec = parse_pooling(settings.pooling)
        self.store = store or Store.open(settings)
        self._encoder: MedVAEEncoder | None = None
        self._space: Space | None = None
        self._index: SpaceIndex | None = None
        self.index_report: OpenReport | None = None
        self._lock = threading.RLock()

    # -- lazily loaded parts

    @property
    def encoder(self) -> MedVAEEncoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = MedVAEEncoder(self.settings)
            return self._encoder

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    def identity(self, pooling: PoolingSpec | None = None) -> SpaceIdentity:
        """The identity of the configured space (or of the same encoder with another pooling)."""
        spec = pooling or self.pooling
        encoder = self.encoder
        return SpaceIdentity(
            model=self.settings.model,
            weights=encoder.weights.identity,
            input_size=self.settings.input_size,
            preprocessing=PREPROCESSING_VERSION,
            pooling=spec.canonical,
            dim=spec.dimension(encoder.latent_channels),
        )

    @property
    def space(self) -> Space:
        with self._lock:
            if self._space is None:
                self._space = self.store.ensure_space(self.identity())
            return self._space

    @property
    def index(self) -> SpaceIndex:
        with self._lock:
            if self._index is None:
                self._index, self.index_report = SpaceIndex.open(
                    store=self.store, space=self.space, directory=self.settings.index_dir
                )
                logger.info("index %s: %s %s", self.space.key[:12], self.index_report.action, self.index_report.reason)
            return self._index

    # -- embedding

    def embed_pixels(self, pixels: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``(B, S, S)`` normalised pixels -> (z ``(B, C, h, w)``, vectors ``(B, D)`` float32)."""
        z = self.encoder.encode(pixels)
        vectors = pool(self.encoder.s2_latent(z), self.pooling).numpy()
        return z, vectors

    # -- descriptions shared by JSON outputs

    def model_info(self) -> dict[str, Any]:
        weights = self.encoder.weights
        return {"name": self.settings.model, "weights": weights.public_label, "weights_identity": weights.identity}

    def space_info(self) -> dict[str, Any]:
        return space_json(self.space)

    def close(self) -> None:
        if self._index is not None:
            self._index.save()
        self.store.close()


def space_json(space: Space) -> dict[str, Any]:
    """A space as JSON outputs show it; random weights always read ``random-init``."""
    random = space.weights.startswith(RANDOM_WEIGHTS_LABEL)
    return {
        "key": space.key,
        "model": space.model,
        "weights": RANDOM_WEIGHTS_LABEL if random else space.weights,
        "input_size": space.input_size,
        "preprocessing": space.preprocessing,
        "pooling": space.pooling,
        "dim": space.dim,
    }
