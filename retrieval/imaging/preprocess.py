"""Model input from decoded pixels: the one place that fits an image or a volume to a space.

:func:`to_model_input` takes what :mod:`retrieval.imaging.decode` or :mod:`retrieval.imaging.volumes`
returned and a :class:`~retrieval.domain.spaces.PreprocessSpec`, and returns the normalised
array the encoder takes: ``(S, S)`` for images, ``(S, S, S)`` for volumes, float32 in ``[0, 1]``.
Torch is imported only for volumes (trilinear resampling), so 2-D decode workers stay light.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from retrieval.domain.spaces import PreprocessSpec
from retrieval.imaging.decode import DecodedImage
from retrieval.imaging.volumes import CT_WINDOW_HU, Volume

PREPROCESSING_VERSIONS = {"stretch": "v2", "letterbox": "v2-letterbox"}
"""2-D pixel path version per fit; bump when it changes vectors (it is part of a space's identity).

v1 (before 2026-11-30) letterboxed and used DICOM's windowed values without min-max scaling;
v2 stretches to the square as medvae's training loader does (``load_2d_finetune``: bicubic,
antialiased ``Resize`` then ``ScaleIntensity(0, 1)``) and min-max scales windowed DICOM."""
VOLUME_PREPROCESSING_VERSION = "vol-v2"
"""3-D: RAS, medvae CT window / MR min-max, isotropic fit to a cube; vol-v2 pools z itself, as medvae's
3-D ``encode`` returns it (vol-v1 pooled the untrained stage-2 head: its vectors stay in their own space)."""


def preprocess_spec(dims: int, input_size: int, fit: str = "stretch") -> PreprocessSpec:
    """The current preprocessing of a 2-D (``fit``: stretch or letterbox) or 3-D space of the given input edge."""
    if dims == 3:
        return PreprocessSpec(dims=3, input_size=input_size, version=VOLUME_PREPROCESSING_VERSION)
    return PreprocessSpec(dims=2, input_size=input_size, version=PREPROCESSING_VERSIONS[fit])


def to_model_input(decoded: DecodedImage | Volume, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image (2-D spec) or a loaded volume (3-D spec) as the encoder takes it."""
    if spec.dims == 3:
        if not isinstance(decoded, Volume):
            raise TypeError(f"a 3-D space takes a volume, not {type(decoded).__name__}")
        return fit_to_cube(normalise(decoded), decoded.spacing, spec.input_size)
    if not isinstance(decoded, DecodedImage):
        raise TypeError(f"a 2-D space takes a decoded image, not {type(decoded).__name__}")
    if spec.version == PREPROCESSING_VERSIONS["letterbox"]:
        return fit_to_square(decoded.pixels, spec.input_size)
    return stretch_to_square(decoded.pixels, spec.input_size)


def stretch_to_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """The input medvae was trained on: resized to ``size`` x ``size`` whatever the aspect ratio
    (bicubic, antialiased when reducing), then min-max scaled to [0, 1] (``ScaleIntensity``).

    Pillow stands in for torchvision's ``Resize(bicubic, antialias=True)`` (which torchvision
    documents as approximating Pillow), so decode workers never import torch.
    """
    height, width = pixels.shape
    if (height, width) == (size, size):
        resized = pixels.astype(np.float32, copy=False)
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        resized = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return scale_intensity(resized)


def fit_to_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """``RETRIEVAL_FIT=letterbox``: aspect-preserving resize so the longer side is ``size``, centred on a
    zero-padded square. Keeps shapes undistorted, but the padding is an input medvae never saw in
    training, and the detector's aspect ratio then shows in the similarity.

    Antialiased (Pillow's bilinear filter widens its support when reducing). Returns float32
    ``(size, size)`` in [0, 1].
    """
    height, width = pixels.shape
    scale = size / max(height, width)
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    if (new_h, new_w) == (height, width):
        resized = pixels.astype(np.float32, copy=False)
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        resized = np.asarray(
            image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.float32
        )
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = scale_intensity(resized)
    return canvas


def scale_intensity(pixels: np.ndarray) -> np.ndarray:
    """medvae's ``ScaleIntensity(0, 1)``: min-max to [0, 1]; an image flat to within 1e-12 (interpolation
    noise) is all zeros. Applied after the resize, it also spreads a DICOM window whose values do not
    reach 0 or 1 over the full range; MR volumes use it too. (``decode.minmax_scale`` differs on purpose:
    it refuses non-finite decoded values and keeps any real range, however small.)"""
    low, high = float(pixels.min()), float(pixels.max())
    if high - low < 1e-12:
        return np.zeros(pixels.shape, dtype=np.float32)
    return ((pixels - low) / (high - low)).astype(np.float32)


def normalise(volume: Volume) -> np.ndarray:
    """[0, 1] voxels as medvae's 3-D loaders scale them (CT window, MR min-max)."""
    voxels = volume.voxels
    if volume.modality == "CT":
        low, high = CT_WINDOW_HU
        return np.clip((voxels - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return scale_intensity(voxels)


def fit_to_cube(voxels: np.ndarray, spacing: tuple[float, float, float], size: int) -> np.ndarray:
    """Isotropic trilinear resample with the longest physical side ``size``, centred in a zero cube."""
    import torch
    import torch.nn.functional as F

    extent = np.array(voxels.shape, dtype=np.float64) * np.array(spacing, dtype=np.float64)
    target = tuple(max(1, int(round(n))) for n in extent * (size / extent.max()))
    tensor = torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32))[None, None]
    if target != voxels.shape:
        tensor = F.interpolate(tensor, size=target, mode="trilinear", align_corners=False, antialias=False)
    cube = np.zeros((size, size, size), dtype=np.float32)
    offsets = [(size - n) // 2 for n in target]
    cube[offsets[0] : offsets[0] + target[0], offsets[1] : offsets[1] + target[1], offsets[2] : offsets[2] + target[2]] = (
        np.clip(tensor[0, 0].numpy(), 0.0, 1.0)
    )
    return cube
