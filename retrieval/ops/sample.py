"""A small sample archive that needs no download: pydicom's bundled DICOM files + generated X-rays.

The generated images are synthetic chest radiograph look-alikes (two lung fields, a spine, ribs,
a heart shadow) in 8- and 16-bit PNG, grouped into study folders with per-study variations and a
few repeat views, so that similar-case search has something to find. Deterministic (seeded).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

BUNDLED_DICOM = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")  # all ship inside pydicom


def synthetic_chest(rng: np.random.Generator, size: int = 256, *, variant: dict[str, float] | None = None) -> np.ndarray:
    """A float32 [0, 1] chest-radiograph look-alike; ``variant`` fixes the study's anatomy."""
    v = variant or study_variant(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = np.exp(-(((xx - 0.5) / 0.42) ** 8 + ((yy - 0.55) / 0.5) ** 8))
    img = 0.55 * body
    for side in (-1, 1):
        cx = 0.5 + side * v["lung_dx"]
        lung = np.exp(-(((xx - cx) / v["lung_w"]) ** 2 + ((yy - 0.45) / v["lung_h"]) ** 2) ** 2)
        img -= 0.35 * lung
    img += 0.35 * np.exp(-(((xx - 0.5) / 0.05) ** 2))  # spine
    img += 0.25 * np.exp(-(((xx - 0.5 - v["heart_dx"]) / 0.13) ** 2 + ((yy - 0.62) / 0.12) ** 2))
    for k in range(int(v["ribs"])):
        y0 = 0.22 + k * 0.065
        img += 0.06 * np.exp(-(((yy - y0 - 0.08 * np.abs(xx - 0.5)) / 0.008) ** 2)) * body
    if v["nodule"] > 0.5:
        img += 0.2 * np.exp(-(((xx - v["nx"]) / 0.03) ** 2 + ((yy - v["ny"]) / 0.03) ** 2))
    img += rng.normal(0.0, 0.01, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def study_variant(rng: np.random.Generator) -> dict[str, float]:
    return {
        "lung_dx": float(rng.uniform(0.15, 0.22)),
        "lung_w": float(rng.uniform(0.09, 0.14)),
        "lung_h": float(rng.uniform(0.2, 0.3)),
        "heart_dx": float(rng.uniform(-0.02, 0.08)),
        "ribs": float(rng.integers(5, 10)),
        "nodule": float(rng.uniform()),
        "nx": float(rng.uniform(0.3, 0.7)),
        "ny": float(rng.uniform(0.3, 0.6)),
    }


def write_sample_set(target: Path, *, studies: int = 6, images_per_study: int = 3, seed: int = 7) -> Path:
    """Write the sample archive under ``target`` (studies as folders) and a labelled manifest.

    Returns ``target``. Existing files are overwritten, so the set is always the same.
    """
    rng = np.random.default_rng(seed)
    target.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(studies):
        variant = study_variant(rng)
        folder = target / f"study_{s:02d}"
        folder.mkdir(exist_ok=True)
        label = "nodule" if variant["nodule"] > 0.5 else "no_finding"
        for i in range(images_per_study):
            pixels = synthetic_chest(rng, 256 + 64 * (i % 2), variant=variant)
            path = folder / f"view_{i}.png"
            if i % 2:
                Image.fromarray((pixels * 65535).astype(np.uint16)).save(path)  # 16-bit
            else:
                Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
            rows.append({"path": str(path.relative_to(target)), "study": f"study_{s:02d}", "labels": label})
    dicom_dir = target / "dicom"
    dicom_dir.mkdir(exist_ok=True)
    try:
        from pydicom.data import get_testdata_file

        for name in BUNDLED_DICOM:
            found = get_testdata_file(name)
            if found:
                shutil.copyfile(str(found), dicom_dir / name)
    except ImportError:  # pragma: no cover - pydicom is a dependency
        pass
    with (target / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "study", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return target


SAMPLE_VOLUMES = {  # name: (modality, voxels, mm spacing); sides not multiples of 16, the body off-centre
    "ct_chest.nii.gz": ("CT", (72, 60, 40), (0.8, 0.8, 2.0)),
    "mr_head.nii.gz": ("MR", (58, 66, 36), (1.0, 1.0, 1.5)),
}


def synthetic_volume(modality: str, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A float32 body-like phantom ``(X, Y, Z)``: CT in Hounsfield units (air, soft tissue, fat rim, bone,
    a lesion), MR in positive arbitrary units. Its foreground touches one edge, so a crop box leaves it."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = ((x - 0.15) / 0.9) ** 2 + (y / 0.7) ** 2 < 1.0
    core = ((x - 0.15) / 0.8) ** 2 + (y / 0.6) ** 2 < 1.0
    bone = ((x - 0.15) / 0.12) ** 2 + ((y + 0.4) / 0.12) ** 2 < 1.0
    lesion = (x - 0.4) ** 2 + (y - 0.1) ** 2 + (z - 0.2) ** 2 < 0.05
    if modality == "CT":
        volume = np.where(body, -90.0, -1000.0) + np.where(core, 130.0, 0.0) + np.where(bone, 700.0, 0.0)
        volume = np.where(lesion & core, 180.0, volume)
        noise = 15.0
    else:
        volume = np.where(body, 300.0, 5.0) + np.where(core, 500.0, 0.0) - np.where(bone, 600.0, 0.0)
        volume = np.where(lesion & core, 1400.0, volume)
        noise = 20.0
    return (volume + rng.normal(0.0, noise, shape)).astype(np.float32)


def write_sample_volumes(target: Path) -> list[Path]:
    """Two small NIfTI phantoms (a CT, an MR) for the 3-D parity check; deterministic."""
    import nibabel as nib

    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (name, (modality, shape, spacing)) in enumerate(SAMPLE_VOLUMES.items()):
        path = target / name
        nib.save(nib.Nifti1Image(synthetic_volume(modality, shape, seed), np.diag([*spacing, 1.0])), str(path))
        paths.append(path)
    return paths
