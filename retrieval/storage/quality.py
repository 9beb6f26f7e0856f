"""Reconstruction-quality scores (PSNR, SSIM) of stored images: which lack one, and storing them."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update

from retrieval.storage.orm import ImageRecord
from retrieval.storage.store import Store


def images_without_quality(store: Store, limit: int) -> list[ImageRecord]:
    """Up to ``limit`` stored images without a score, oldest first."""
    with store.sessions() as session:
        return list(session.scalars(
            select(ImageRecord).where(ImageRecord.recon_psnr.is_(None)).order_by(ImageRecord.id).limit(limit)
        ))


def set_quality(store: Store, scores: Sequence[tuple[int, float, float]]) -> None:
    """Store ``(image_id, PSNR, SSIM)`` rows in one transaction."""
    with store.sessions.begin() as session:
        for image_id, psnr_db, ssim_value in scores:
            session.execute(
                update(ImageRecord).where(ImageRecord.id == image_id)
                .values(recon_psnr=float(psnr_db), recon_ssim=float(ssim_value))
                .execution_options(synchronize_session=False)
            )
