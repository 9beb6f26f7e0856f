"""Small synthetic CT volumes as NIfTI files and as DICOM series, for the 3-D tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from dicom_factory import write_dicom
from pydicom.uid import CTImageStorage, generate_uid


def phantom_hu(seed: int, shape: tuple[int, int, int] = (32, 32, 24)) -> np.ndarray:
    """A body-like phantom in Hounsfield units ``(rows, cols, slices)``: air, soft tissue, bone, a lesion."""
    rng = np.random.default_rng(seed)
    r, c, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = (r / 0.85) ** 2 + (c / (0.6 + 0.2 * rng.random())) ** 2 < 1.0
    volume = np.where(body, 40.0, -1000.0)
    spine = ((r - 0.5) / 0.15) ** 2 + (c / 0.15) ** 2 < 1.0
    volume[spine] = 700.0
    centre = rng.uniform(-0.4, 0.3, size=3)
    lesion = ((r - centre[0]) ** 2 + (c - centre[1]) ** 2 + (k - centre[2]) ** 2) < (0.1 + 0.15 * rng.random()) ** 2
    volume[lesion & body] = 120.0 + 200.0 * rng.random()
    return (volume + rng.normal(0.0, 15.0, shape)).astype(np.float32)


def write_nifti(path: Path, hu: np.ndarray, *, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> Path:
    """``hu`` indexed ``(x, y, z)`` with a RAS affine of the given spacing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.diag([*spacing, 1.0])), str(path))
    return path


def write_ct_series(folder: Path, hu: np.ndarray, *, slice_positions: list[float] | None = None,
                    pixel_spacing: float = 1.0, study_uid: str | None = None, **tags: object) -> list[Path]:
    """An axial CT series from ``hu`` ``(rows, cols, slices)``: one file per slice, shuffled names."""
    rows, cols, count = hu.shape
    positions = slice_positions if slice_positions is not None else [2.0 * k for k in range(count)]
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    order = np.random.default_rng(count).permutation(count)  # file names do not follow slice order
    paths = []
    for k in range(count):
        stored = np.clip(hu[:, :, k] + 1024.0, 0, 65535).astype(np.uint16)
        paths.append(write_dicom(
            folder / f"slice{order[k]:03d}.dcm", stored, slope=1.0, intercept=-1024.0,
            Modality="CT", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPClassUID=CTImageStorage,
            ImagePositionPatient=[0.0, 0.0, float(positions[k])], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[pixel_spacing, pixel_spacing], SliceThickness=2.0, InstanceNumber=k + 1, **tags,
        ))
    return paths
