"""The 2-D stretch fit (:func:`retrieval.imaging.preprocess.stretch_to_square`) in torch, on the encoder's device.

The same arithmetic as the Pillow path: a bicubic, antialiased resize to ``size`` x ``size``
(torch's antialiased bicubic kernel is Pillow's: a = -0.5, its support widened when reducing),
then medvae's ``ScaleIntensity`` min-max to [0, 1], an image flat to within 1e-12 all zeros. It
equals the Pillow path within 2e-6 on images from 200 x 400 to 2500 x 2048 (tests/test_imaging.py).

:func:`fit_frame` also applies a decoded frame's :class:`~retrieval.imaging.decode.UnitMap` first (min-max of a
grayscale raster; DICOM rescale -> window -> MONOCHROME1 inversion), so a decode worker only reads and
unpacks the stored integers and the device does the rest (decision 36); from stored values the result
equals the CPU path within 1e-5 (float32 windowing against pydicom's float64 rescale).

Queries use it when the encoder runs on a GPU (``RETRIEVAL_QUERY_FIT_DEVICE``), ingest likewise
(``RETRIEVAL_INGEST_FIT_DEVICE``): the resize of a 2048² image costs 11.8 ms of one CPU core with
Pillow here, a fraction of a millisecond on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.imaging.decode import IN_UNIT, UnitMap

FLAT = 1e-12
"""As :func:`retrieval.imaging.preprocess.scale_intensity`: a value range below this is a flat image (all zeros)."""


def to_device(values: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` on ``device``, copied into a new tensor (``values`` may be reused at once after the call), in their
    own dtype, except uint16 (16-bit PNG and DICOM), which arrives as int32 with the same values: it travels as
    int16 bits and is widened on the device, as torch's uint16 has only "limited support" (copies, not every
    kernel on every device). To a GPU through a pinned staging buffer without waiting: torch's pinned-memory
    cache keeps the buffer until the copy has run. A tensor already on ``device`` (a frame decoded there,
    :mod:`retrieval.imaging.device_codec`) is used as it is."""
    pinned = device.type == "cuda"
    if isinstance(values, torch.Tensor) and values.device.type == device.type and device.index in (None, values.device.index):
        return values
    if isinstance(values, torch.Tensor):
        return values.pin_memory().to(device, non_blocking=True) if pinned else values.to(device, copy=True)
    unsigned16 = values.dtype == np.uint16
    source = values.view(np.int16) if unsigned16 else values
    dtype = torch.from_numpy(np.empty(0, dtype=source.dtype)).dtype  # numpy's dtype in torch
    staging = torch.empty(source.shape, dtype=dtype, pin_memory=pinned)
    staging.numpy()[...] = source  # one copy, from a read-only array or a shared-memory slot alike
    moved = staging.to(device, non_blocking=True) if pinned else staging
    return moved.to(torch.int32).bitwise_and_(0xFFFF) if unsigned16 else moved


def fit_frame(values: np.ndarray | torch.Tensor, unit: UnitMap, size: int, device: torch.device) -> torch.Tensor:
    """``(H, W)`` stored values and their map to [0, 1] -> the ``(size, size)`` float32 model input on ``device``."""
    image = to_device(values, device).to(torch.float32)
    return _stretch(apply_unit_map(image, unit), size)


def stretch_to_square(pixels: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """``(H, W)`` decoded pixels in [0, 1] -> ``(size, size)`` float32 in [0, 1] on ``device``."""
    return fit_frame(pixels, IN_UNIT, size, device)


def apply_unit_map(values: torch.Tensor, unit: UnitMap) -> torch.Tensor:
    """float32 stored values -> [0, 1], as :mod:`retrieval.imaging.decode` maps them on the CPU."""
    if unit.kind == "unit":
        return values
    if unit.kind == "minmax":  # decode.minmax_scale (stored integers are always finite)
        low, span = values.min(), values.max() - values.min()
        return torch.where(span > 0, (values - low) / span.clamp_min(FLAT), torch.zeros_like(values))
    rescaled = values * unit.slope + unit.intercept if (unit.slope, unit.intercept) != (1.0, 0.0) else values
    windowed = _window(rescaled, unit)
    return 1.0 - windowed if unit.invert else windowed


def _window(values: torch.Tensor, unit: UnitMap) -> torch.Tensor:
    """decode.apply_window: DICOM PS3.3 C.11.2.1.2-3."""
    center, width = unit.center, unit.width
    if unit.function == "SIGMOID":
        return torch.sigmoid(4.0 * (values - center) / width)
    if unit.function == "LINEAR_EXACT":
        return ((values - center) / width + 0.5).clamp(0.0, 1.0)
    denominator = max(max(width, 1.0) - 1.0, 1.0)
    return ((values - (center - 0.5)) / denominator + 0.5).clamp(0.0, 1.0)


def _stretch(image: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] pixels -> the bicubic, antialiased ``size`` x ``size`` resize, min-max scaled."""
    flat = image.max() - image.min() < FLAT  # judged before the resize, whose float ripple on a flat image
    if tuple(image.shape) != (size, size):  # (~1e-8 in torch, none in Pillow) min-max would blow up to [0, 1]
        image = F.interpolate(image[None, None], size=(size, size), mode="bicubic", antialias=True,
                              align_corners=False)[0, 0]
    low, span = image.min(), image.max() - image.min()
    return torch.where(flat | (span < FLAT), torch.zeros_like(image), (image - low) / span.clamp_min(FLAT))
