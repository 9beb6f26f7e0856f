"""CT/MR volumes for the 3-D MedVAE models: find them, read them, normalise them, fit them.

Contract:

* :func:`scan_volumes` lists the volumes under a folder (or one NIfTI file): every ``.nii`` /
  ``.nii.gz`` file, and every DICOM series (files grouped by SeriesInstanceUID, headers only).
  It never raises for a bad item: an unreadable one comes back with ``error`` set.
* :func:`content_sha256` fingerprints an item's files before anything is decoded.
* :func:`load_volume` reads one item into a :class:`Volume`: voxels in RAS orientation (NIfTI
  through nibabel's closest canonical; a DICOM series is sorted by position along the slice
  normal and given the equivalent affine first), spacing in mm, the modality and, for DICOM,
  the first slice's header for metadata. A series whose slice spacing is not uniform (a gap,
  a duplicate position, a mixed series) raises :class:`~retrieval.errors.ImageDecodeError`
  with the positions that break it.
* :mod:`retrieval.imaging.preprocess` turns a :class:`Volume` into model input (medvae's
  intensities, foreground crop, native spacing up to a voxel budget).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.domain.items import OUTSIDE_ROOTS, SourceItem, resolved_under
from retrieval.domain.metadata import ImageMetadata, from_dicom
from retrieval.errors import ImageDecodeError, InvalidRequestError
from retrieval.imaging.decode import looks_like_dicom

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CT_WINDOW_HU = (-1000.0, 1000.0)
SPACING_TOLERANCE = 0.05  # relative deviation from the median slice spacing that is still uniform
MIN_SLICES = 2


@dataclass
class Volume:
    """Voxels ``(X, Y, Z)`` in RAS order, float32 in the source's units (HU for CT)."""

    voxels: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    modality: str  # "CT" or "MR"
    kind: str  # "nifti" or "dicom-series"
    header: Any = None  # first DICOM slice (pixels not loaded), for metadata


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


# --------------------------------------------------------------------------- scanning


def scan_volumes(source: str | Path, *, roots: list[Path] | None = None) -> list[SourceItem]:
    """NIfTI files and DICOM series under ``source`` (sorted; hidden entries skipped).

    A series item's ``path`` is its folder plus ``#SeriesInstanceUID``; its files travel in
    ``row["files"]`` (``os.pathsep``-joined) so the item stays a plain value. With ``roots`` (API
    jobs) a file that resolves outside them is a failed item and is never opened.
    """
    root = Path(source).expanduser()
    if root.is_file() and is_nifti(root):
        inside = resolved_under(root, roots) if roots is not None else root
        return [SourceItem(path=str(inside)) if inside else SourceItem(path=str(root), error=OUTSIDE_ROOTS)]
    if not root.is_dir():
        raise InvalidRequestError(f"{root}: not a folder or a NIfTI file", detail={"field": "source", "value": str(root)})
    import pydicom

    items: list[SourceItem] = []
    series: dict[str, list[str]] = defaultdict(list)
    series_folder: dict[str, str] = {}
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            if roots is not None:
                inside = resolved_under(path, roots)
                if inside is None:
                    items.append(SourceItem(path=path, error=OUTSIDE_ROOTS))
                    continue
                path = str(inside)
            if is_nifti(name):
                items.append(SourceItem(path=path))
                continue
            try:
                with open(path, "rb") as handle:
                    head = handle.read(132)
                if not (looks_like_dicom(head) or name.lower().endswith(".dcm")):
                    continue
                header = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                         specific_tags=["SeriesInstanceUID", "Modality"])
            except Exception as exc:  # noqa: BLE001 - an unreadable file is one failed item
                items.append(SourceItem(path=path, error=f"cannot read DICOM header ({type(exc).__name__})"))
                continue
            uid = str(header.get("SeriesInstanceUID", "") or "").strip()
            if not uid:
                items.append(SourceItem(path=path, error="DICOM file without SeriesInstanceUID"))
                continue
            series[uid].append(path)
            series_folder.setdefault(uid, directory)
    for uid, paths in sorted(series.items()):
        items.append(SourceItem(path=f"{series_folder[uid]}#{uid}", row={"files": os.pathsep.join(sorted(paths))}))
    return items


# --------------------------------------------------------------------------- reading


def content_sha256(item: SourceItem) -> str:
    """sha256 of a volume item's bytes: the NIfTI file, or the series' files in sorted order.

    It identifies the volume for idempotent ingest and is cheap next to decoding, so a re-run
    skips stored volumes before reading any voxel. Raises ``OSError`` when a file cannot be read.
    """
    digest = hashlib.sha256()
    paths = sorted(item.row["files"].split(os.pathsep)) if item.row.get("files") else [item.path]
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def load_volume(item: SourceItem, *, max_voxels: int) -> Volume:
    """Read a scanned item (NIfTI file or DICOM series) into a RAS :class:`Volume`."""
    if item.row.get("files"):
        return _load_dicom_series(item.path, item.row["files"].split(os.pathsep), max_voxels=max_voxels)
    return load_nifti(item.path, max_voxels=max_voxels)


def load_nifti(path: str | Path, *, max_voxels: int) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
            raise ImageDecodeError(f"{path}: expected a 3-D volume, got shape {shape}", detail={"path": str(path)})
        if int(np.prod(shape)) > max_voxels:
            raise ImageDecodeError(f"{path}: {int(np.prod(shape))} voxels exceed the {max_voxels} limit",
                                   detail={"path": str(path)})
        canonical = nib.as_closest_canonical(nib.squeeze_image(image))
        voxels = np.asarray(canonical.get_fdata(dtype=np.float32), dtype=np.float32)
        spacing = tuple(round(float(z), 6) for z in canonical.header.get_zooms()[:3])  # header floats are float32
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})",
                               detail={"path": str(path)}) from exc
    _check_shape(str(path), voxels, spacing)
    return Volume(voxels=voxels, spacing=spacing, modality=guess_modality(voxels), kind="nifti")


def _load_dicom_series(label: str, files: list[str], *, max_voxels: int) -> Volume:
    import nibabel as nib
    import pydicom

    try:
        slices = [pydicom.dcmread(path, force=True) for path in files]
    except Exception as exc:
        raise ImageDecodeError(f"{label}: cannot read a slice ({type(exc).__name__}: {exc})", detail={"path": label}) from exc
    if len(slices) < MIN_SLICES:
        raise ImageDecodeError(f"{label}: a series needs at least {MIN_SLICES} slices, found {len(slices)}",
                               detail={"path": label})
    for required in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if any(required not in ds for ds in slices):
            raise ImageDecodeError(f"{label}: slices without {required}: cannot place them in a volume",
                                   detail={"path": label, "field": required})
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=np.float64))) for ds in slices])
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    positions = positions[order]
    slice_spacing = check_slice_spacing(label, positions)
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    if rows * cols * len(slices) > max_voxels:
        raise ImageDecodeError(f"{label}: {rows * cols * len(slices)} voxels exceed the {max_voxels} limit",
                               detail={"path": label})
    if any((int(ds.Rows), int(ds.Columns)) != (rows, cols) for ds in slices):
        raise ImageDecodeError(f"{label}: slices of different sizes in one series", detail={"path": label})
    try:
        stack = np.stack([_slice_units(ds) for ds in slices], axis=-1)  # (rows, cols, slices)
    except Exception as exc:
        raise ImageDecodeError(f"{label}: cannot decode slice pixels ({type(exc).__name__}: {exc})",
                               detail={"path": label}) from exc
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    affine = np.eye(4)  # voxel (i=column, j=row, k=slice) -> LPS mm, then to RAS
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = np.array(slices[0].ImagePositionPatient, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    canonical = nib.as_closest_canonical(nib.Nifti1Image(stack.transpose(1, 0, 2), affine))
    voxels = np.asarray(canonical.get_fdata(dtype=np.float32), dtype=np.float32)
    spacing = tuple(round(float(z), 6) for z in canonical.header.get_zooms()[:3])  # header floats are float32
    _check_shape(label, voxels, spacing)
    modality = str(slices[0].get("Modality", "") or "").upper()
    header = pydicom.dcmread(files[int(order[0])], stop_before_pixels=True, force=True)
    return Volume(voxels=voxels, spacing=spacing, modality=modality if modality in ("CT", "MR") else guess_modality(voxels),
                  kind="dicom-series", header=header)


def _slice_units(dataset: Any) -> np.ndarray:
    pixels = dataset.pixel_array.astype(np.float32)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def check_slice_spacing(label: str, positions: np.ndarray) -> float:
    """The uniform spacing of sorted slice positions (mm); refuses gaps, duplicates and mixed series."""
    gaps = np.diff(positions)
    if np.any(gaps <= 1e-4):
        first = int(np.argmax(gaps <= 1e-4))
        raise ImageDecodeError(
            f"{label}: two slices at the same position ({positions[first]:.2f} mm): duplicate or mixed series",
            detail={"path": label, "reason": "duplicate_position"},
        )
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > SPACING_TOLERANCE * median:
        raise ImageDecodeError(
            f"{label}: slice spacing is not uniform ({gaps.min():.2f} to {gaps.max():.2f} mm; "
            f"{gaps[worst]:.2f} mm between slices {worst} and {worst + 1} against a median of {median:.2f} mm): "
            "a missing slice or a mixed series",
            detail={"path": label, "reason": "inconsistent_spacing", "min_mm": float(gaps.min()),
                    "max_mm": float(gaps.max())},
        )
    return median


def _check_shape(label: str, voxels: np.ndarray, spacing: tuple[float, ...]) -> None:
    if voxels.ndim != 3 or min(voxels.shape) < MIN_SLICES:
        raise ImageDecodeError(f"{label}: not a volume (shape {voxels.shape})", detail={"path": label})
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ImageDecodeError(f"{label}: voxel spacing {spacing} is not positive", detail={"path": label})
    if not np.isfinite(voxels).all():
        raise ImageDecodeError(f"{label}: voxels hold NaN or infinity", detail={"path": label})


def guess_modality(voxels: np.ndarray) -> str:
    """CT when the volume holds air-like values (below -500, i.e. Hounsfield units), else MR."""
    return "CT" if float(np.percentile(voxels, 1)) < -500.0 else "MR"


# --------------------------------------------------------------------------- model input


def orthogonal_slices(voxels: np.ndarray, spacing: tuple[float, float, float] | None = None) -> np.ndarray:
    """The three middle slices (sagittal, coronal, axial) of an ``(X, Y, Z)`` volume side by side.

    With ``spacing`` (mm per voxel) each panel is resized so that a millimetre has one length in
    every direction (the finest spacing keeps its voxels). Panels are centred vertically on a
    black strip as tall as the tallest.
    """
    if spacing is not None:
        finest = min(spacing)
        shape = tuple(max(1, round(n * s / finest)) for n, s in zip(voxels.shape, spacing, strict=True))
        if shape != voxels.shape:
            voxels = _resized(voxels, shape)
    x, y, z = (n // 2 for n in voxels.shape)
    # display convention: superior up, anterior/right as radiologists view them
    panels = [np.rot90(voxels[x, :, :]), np.rot90(voxels[:, y, :]), np.rot90(voxels[:, :, z])]
    height = max(panel.shape[0] for panel in panels)
    strip = np.zeros((height, sum(panel.shape[1] for panel in panels)), dtype=np.float32)
    left = 0
    for panel in panels:
        top = (height - panel.shape[0]) // 2
        strip[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1]
    return strip


def _resized(voxels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def volume_metadata(volume: Volume, *, secret: str, date_shift_days: int) -> ImageMetadata:
    """DICOM header fields for a series (series-level: no SOPInstanceUID); the modality for NIfTI."""
    if volume.header is None:
        return ImageMetadata(modality=volume.modality)
    metadata = from_dicom(volume.header, secret=secret, date_shift_days=date_shift_days)
    metadata.sop_uid = None  # one vector per series
    metadata.modality = metadata.modality or volume.modality
    return metadata
