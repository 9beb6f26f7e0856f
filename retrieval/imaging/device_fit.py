"""The 2-D stretch fit (:func:`retrieval.imaging.preprocess.stretch_to_square`) in torch, on the encoder's device.

The same arithmetic as the Pillow path: a bicubic, antialiased resize to ``size`` x ``size``
(torch's antialiased bicubic kernel is Pillow's: a = -0.5, its support widened when reducing),
then medvae's ``ScaleIntensity`` min-max to [0, 1], an image flat to within 1e-12 all zeros. It
equals the Pillow path within 2e-6 on images from 200 x 400 to 2500 x 2048
(tests/test_imaging.py). Queries use it when the encoder runs on a GPU (``RETRIEVAL_QUERY_FIT_DEVICE``):
the resize of a 2048² upload costs 11.8 ms of one CPU core with Pillow here, a fraction of a
millisecond on a GPU, and the request thread stays free for decoding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FLAT = 1e-12
"""As :func:`retrieval.imaging.preprocess.scale_intensity`: a value range below this is a flat image (all zeros)."""


def stretch_to_square(pixels: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """``(H, W)`` decoded pixels -> ``(size, size)`` float32 in [0, 1] on ``device`` (copied there from pinned
    memory, without waiting, when it is a GPU)."""
    image = torch.as_tensor(pixels, dtype=torch.float32)
    image = image.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else image.to(device)
    flat = image.max() - image.min() < FLAT  # judged before the resize, whose float ripple on a flat image
    if tuple(image.shape) != (size, size):  # (~1e-8 in torch, none in Pillow) min-max would blow up to [0, 1]
        image = F.interpolate(image[None, None], size=(size, size), mode="bicubic", antialias=True,
                              align_corners=False)[0, 0]
    low, span = image.min(), image.max() - image.min()
    return torch.where(flat | (span < FLAT), torch.zeros_like(image), (image - low) / span.clamp_min(FLAT))
