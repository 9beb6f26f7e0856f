"""Archive-fitted vector transforms in the database (:class:`~retrieval.storage.orm.VectorTransformRecord`).

A transform is stored once under its content key; spaces name it in their pooling
(``spp:1,2,4+whiten:<key>``), so it must outlive the process that fitted it (design decision 28).
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from retrieval.domain.whitening import VectorTransform
from retrieval.storage.orm import Space, VectorTransformRecord
from retrieval.storage.store import Store


def space_vectors(store: Store, space: Space) -> np.ndarray:
    """Every stored vector of ``space`` as one ``(N, dim)`` float32 matrix: what a transform is fitted on."""
    chunks = [np.stack([row.vector for row in chunk]) for chunk in store.vectors_after(space.id)]
    return np.concatenate(chunks) if chunks else np.empty((0, space.dim), dtype=np.float32)


def save_transform(store: Store, transform: VectorTransform, *, fitted_space: str, fitted_vectors: int) -> None:
    """Store a fitted vector transform under its key (a second save of the same key is a no-op)."""
    with store.sessions.begin() as session:
        if session.scalar(select(VectorTransformRecord.id).where(VectorTransformRecord.key == transform.key)):
            return
        session.add(VectorTransformRecord(
            key=transform.key, method=transform.method, dim=int(transform.mean.shape[0]),
            mean=np.ascontiguousarray(transform.mean, dtype=np.float32).tobytes(),
            matrix=None if transform.matrix is None else np.ascontiguousarray(transform.matrix, np.float32).tobytes(),
            fitted_space=fitted_space, fitted_vectors=fitted_vectors,
        ))


def load_transform(store: Store, key: str) -> VectorTransform | None:
    """The stored vector transform ``key``, or None."""
    with store.sessions() as session:
        row = session.scalar(select(VectorTransformRecord).where(VectorTransformRecord.key == key))
    if row is None:
        return None
    mean = np.frombuffer(row.mean, np.float32).copy()
    matrix = None if row.matrix is None else np.frombuffer(row.matrix, np.float32).reshape(row.dim, row.dim).copy()
    return VectorTransform(row.method, mean, matrix)
