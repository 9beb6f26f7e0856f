"""Archive-fitted vector transforms: centring and PCA-whitening of a space's pooled vectors.

Pooled MedVAE vectors of one archive are all alike (unrelated X-rays score 0.9+ against each
other): a shared mean direction dominates every inner product, and a few high-variance directions
dominate what is left. Fitted on the archive's own vectors:

* ``center``: subtract the archive mean, renormalise. Scores spread out around 0 instead of
  piling up near 1, and rank on what differs between images.
* ``whiten``: centre, rotate onto the principal axes and scale each by ``(lambda + shrink)^-1/2``,
  renormalise (Jegou & Chum, ECCV 2012). Every direction of variation then counts alike; the
  shrinkage (:data:`SHRINKAGE` x the mean eigenvalue) keeps the weakest, mostly noise, directions
  from being blown up.

A fitted transform is data, not code: its ``key`` (sha256 of method and arrays) names it in the
space's pooling (``spp:1,2,4+whiten:<key[:12]>``), so a refit is a new space (design decision 28).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

METHODS = ("center", "whiten")
SHRINKAGE = 0.1
KEY_LENGTH = 12


@dataclass(frozen=True)
class VectorTransform:
    """``normalise((x - mean) @ matrix)``; ``matrix`` is None for centring (identity)."""

    method: str
    mean: np.ndarray = field(repr=False)
    matrix: np.ndarray | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.method.encode())
        digest.update(np.ascontiguousarray(self.mean, dtype=np.float32).tobytes())
        if self.matrix is not None:
            digest.update(np.ascontiguousarray(self.matrix, dtype=np.float32).tobytes())
        return digest.hexdigest()[:KEY_LENGTH]

    @property
    def suffix(self) -> str:
        """What a pooling spec carries to name this transform: ``whiten:<key>``."""
        return f"{self.method}:{self.key}"

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """``(N, D)`` vectors -> transformed, L2-normalised float32 ``(N, D)``."""
        out = np.asarray(vectors, dtype=np.float32) - self.mean
        if self.matrix is not None:
            out = out @ self.matrix
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def fit_transform(vectors: np.ndarray, method: str) -> VectorTransform:
    """Fit ``method`` (``center`` or ``whiten``) on ``(N, D)`` vectors (N >= 2).

    With fewer vectors than about 2D the covariance is not full rank: the shrinkage then sets the
    scale of the unseen directions (see :func:`stable_fit`). Raises ``ValueError`` with the reason
    (unknown method, too few vectors).
    """
    if method not in METHODS:
        raise ValueError(f"transform {method!r} is not one of {', '.join(METHODS)}")
    data = np.asarray(vectors, dtype=np.float64)
    count, dim = data.shape
    if count < 2:
        raise ValueError(f"{method} needs at least 2 vectors to fit (the space has {count})")
    mean = data.mean(axis=0)
    if method == "center":
        return VectorTransform("center", mean.astype(np.float32))
    eigenvalues, axes = np.linalg.eigh(np.cov(data - mean, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, axes = np.clip(eigenvalues[order], 0.0, None), axes[:, order]
    scale = 1.0 / np.sqrt(eigenvalues + SHRINKAGE * eigenvalues.mean())
    axes = axes * np.where(axes[np.abs(axes).argmax(axis=0), np.arange(dim)] < 0, -1.0, 1.0)  # deterministic signs
    return VectorTransform("whiten", mean.astype(np.float32), (axes * scale).astype(np.float32))


def stable_fit(count: int, dim: int) -> bool:
    """Whether ``count`` vectors of ``dim`` values estimate a full covariance well (more than 2D of them)."""
    return count > 2 * dim
