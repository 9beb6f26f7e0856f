"""Model input from decoded pixels: the one place that fits an image or a volume to a space.

:func:`to_model_input` takes what :mod:`retrieval.imaging.decode` or :mod:`retrieval.imaging.volumes`
returned and a :class:`~retrieval.domain.spaces.PreprocessSpec`, and returns the normalised
array the encoder takes: ``(S, S)`` for images, ``(X, Y, Z)`` for volumes (:func:`fit_volume`: sides
multiples of 16, at most the spec's voxel budget), float32 in ``[0, 1]``. Torch and MONAI are
imported only to downsample volumes, so 2-D decode workers stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
VOLUME_PREPROCESSING_VERSION = "vol-v3"
"""3-D pixel path version. vol-v3 follows medvae's ``load_ct_3d`` / ``load_mri_3d``: RAS, CT window or MR
min-max, foreground crop with sides divisible by 16, at native spacing up to a voxel budget (antialiased
downsampling only above it). vol-v2 resampled every volume to an isotropic 128^3 cube; vol-v1 also pooled
the untrained stage-2 head. Vectors of older versions stay in their own spaces."""
VOLUME_DIVISIBLE = 16
"""medvae's ``CropForeground(k_divisible=[16, 16, 16])``: every side of the model input is a multiple of 16."""
FOREGROUND_LEVEL = 0.5
"""medvae crops to the voxels its normalised input (``2x - 1``) holds above 0: x > 0.5 here (CT: above 0 HU)."""
OUTSIDE_VALUE = 0.5
"""What medvae's crop pads with where the box leaves the volume: 0 in its [-1, 1] input, 0.5 in our [0, 1]."""


@dataclass(frozen=True)
class FittedVolume:
    """A volume as the 3-D encoder takes it: ``voxels`` ``(X, Y, Z)`` float32 in [0, 1], each side a multiple
    of 16; ``spacing`` the mm of one of its voxels (the source's spacing unless the budget downsampled it);
    ``box`` the ``(start, end)`` source voxels it covers per axis (may reach outside: padded)."""

    voxels: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    box: tuple[tuple[int, int], ...]


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
        return fit_volume(decoded, max_voxels=spec.input_size).voxels
    if not isinstance(decoded, DecodedImage):
        raise TypeError(f"a 2-D space takes a decoded image, not {type(decoded).__name__}")
    if decoded.unit.kind != "unit":
        raise TypeError("stored values, not [0, 1] pixels: retrieval.imaging.device_fit.fit_frame fits those")
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


def fit_volume(volume: Volume, *, max_voxels: int) -> FittedVolume:
    """medvae's 3-D input (``load_ct_3d`` / ``load_mri_3d``), within a budget of ``max_voxels``.

    Intensities as :func:`normalise`; then medvae's ``CropForeground(k_divisible=16)``: the bounding
    box of the voxels above :data:`FOREGROUND_LEVEL`, grown about its centre to sides divisible by 16
    (into the volume where it can, padded with :data:`OUTSIDE_VALUE` where it leaves it). A volume with
    no such voxel keeps its whole extent (medvae's crop would leave nothing). At native spacing, as
    medvae encodes, while the box holds at most ``max_voxels``; above that, every axis is reduced by
    the same factor (native anisotropy kept) to multiples of 16, with Gaussian antialiasing
    (MONAI ``Resize(anti_aliasing=True)``), and the spacing grows accordingly.
    """
    voxels = normalise(volume)
    box = _foreground_box(voxels)
    cropped = _crop_padded(voxels, box)
    spacing = tuple(float(s) for s in volume.spacing)
    count = int(np.prod(cropped.shape))
    if count > max_voxels:
        factor = (max_voxels / count) ** (1.0 / 3.0)
        target = tuple(max(VOLUME_DIVISIBLE, int(n * factor) // VOLUME_DIVISIBLE * VOLUME_DIVISIBLE)
                       for n in cropped.shape)
        spacing = tuple(s * n / t for s, n, t in zip(spacing, cropped.shape, target, strict=True))
        cropped = _downsample(cropped, target)
    return FittedVolume(voxels=cropped, spacing=spacing, box=box)  # type: ignore[arg-type]


def _foreground_box(voxels: np.ndarray) -> tuple[tuple[int, int], ...]:
    """medvae's crop box (MONAI ``CropForeground.compute_bounding_box`` with ``k_divisible=16``)."""
    foreground = voxels > FOREGROUND_LEVEL
    box = []
    for axis, size in enumerate(voxels.shape):
        others = tuple(a for a in range(voxels.ndim) if a != axis)
        present = np.flatnonzero(foreground.any(axis=others))
        start, end = (int(present[0]), int(present[-1]) + 1) if present.size else (0, size)
        grown = -(-(end - start) // VOLUME_DIVISIBLE) * VOLUME_DIVISIBLE
        start -= (grown - (end - start)) // 2
        box.append((start, start + grown))
    return tuple(box)


def _crop_padded(voxels: np.ndarray, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``voxels[box]``, with :data:`OUTSIDE_VALUE` where the box leaves the volume."""
    out = np.full([end - start for start, end in box], OUTSIDE_VALUE, dtype=np.float32)
    source = tuple(slice(max(0, start), min(size, end)) for (start, end), size in zip(box, voxels.shape, strict=True))
    target = tuple(slice(max(0, start) - start, min(size, end) - start)
                   for (start, end), size in zip(box, voxels.shape, strict=True))
    out[target] = voxels[source]
    return out


def _downsample(voxels: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    """Antialiased trilinear resize to ``target`` (MONAI's Gaussian prefilter, sigma as scikit-image's)."""
    import torch
    from monai.transforms import Resize

    resize = Resize(spatial_size=target, mode="trilinear", align_corners=False, anti_aliasing=True)
    with torch.inference_mode():
        out = resize(torch.from_numpy(np.ascontiguousarray(voxels))[None])
    return np.clip(np.asarray(out[0], dtype=np.float32), 0.0, 1.0)
