"""Previews: images reconstructed by the MedVAE decoder from stored latents, as PNG bytes.

A preview is a *reconstruction*, not the original pixels; the PNG says so in its text chunks.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from retrieval.imaging.volumes import orthogonal_slices
from retrieval.service import SpaceService

PREVIEW_NOTE = "MedVAE reconstruction decoded from the stored latent; not the original pixels."
VOLUME_PREVIEW_NOTE = (
    "Middle sagittal, coronal and axial slices of the MedVAE 3-D reconstruction decoded from the stored latent; "
    "not the original voxels."
)


def to_png(pixels: np.ndarray, *, note: str = PREVIEW_NOTE) -> bytes:
    """``(H, W)`` float in [0, 1] -> 8-bit grayscale PNG bytes carrying ``note``."""
    image = Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", note)
    info.add_text("Software", "medvae-retrieval")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def reconstruct(service: SpaceService, image_id: int) -> np.ndarray:
    """Decode the stored z of ``image_id`` (this space's encoder) to ``(S, S)`` pixels (``(S, S, S)`` for volumes)."""
    return service.encoder.decode(service.stored_latent(image_id)[None])[0]


def preview_png(service: SpaceService, image_id: int) -> bytes:
    """The decoded image; for a volume, its three orthogonal middle slices side by side."""
    pixels = reconstruct(service, image_id)
    if pixels.ndim == 3:
        return to_png(orthogonal_slices(pixels), note=VOLUME_PREVIEW_NOTE)
    return to_png(pixels)
