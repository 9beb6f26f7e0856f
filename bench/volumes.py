"""3-D cost of preprocessing vol-v3 (medvae's foreground crop at native spacing, within a voxel budget).

A CT-like phantom of a typical chest CT (512 x 512 x 240 voxels of 0.7 x 0.7 x 1.25 mm, the body off
the table) is written as NIfTI, then for each voxel budget: load + fit (RAS, window, crop, antialiased
downsampling when over budget) and one encode with ``medvae_4_1_3d`` (seeded random weights: the cost
is the trained model's), with the old vol-v2 isotropic 128^3 cube beside them for comparison. Prints
a table and writes JSON to ``bench/results/``.

    python -m bench.volumes [--budgets 262144,2097152] [--encode-budgets 262144,2097152]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.domain.items import SourceItem
from retrieval.imaging.preprocess import fit_volume, normalise
from retrieval.imaging.volumes import load_volume
from retrieval.model.encoder import MedVAEEncoder, cpu_has_bf16
from retrieval.ops.sample import synthetic_volume

SHAPE, SPACING = (512, 512, 240), (0.7, 0.7, 1.25)


def _vol_v2_cube(voxels: np.ndarray, spacing: tuple[float, ...], size: int = 128) -> np.ndarray:
    """The retired vol-v2 fit: isotropic trilinear (no antialiasing), longest side ``size``, zero-padded cube."""
    extent = np.array(voxels.shape) * np.array(spacing)
    target = tuple(max(1, round(n)) for n in extent * (size / extent.max()))
    resized = F.interpolate(torch.from_numpy(voxels)[None, None], size=target, mode="trilinear")[0, 0].numpy()
    cube = np.zeros((size,) * 3, np.float32)
    cube[tuple(slice(0, n) for n in target)] = resized
    return cube


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="262144,2097152,4096000,16777216", help="voxel budgets to fit")
    parser.add_argument("--encode-budgets", default="262144,2097152", help="budgets also encoded (slow on a CPU)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_volume("CT", SHAPE), np.diag([*SPACING, 1.0])), str(path))
        started = time.perf_counter()
        volume = load_volume(SourceItem(path=str(path)), max_voxels=10**9)
        load_s = time.perf_counter() - started
        encoder = MedVAEEncoder(Settings(data_dir=Path(folder) / "data", weights="random", model="medvae_4_1_3d",
                                         id_secret="bench"))
        encode_budgets = {int(b) for b in args.encode_budgets.split(",") if b}
        started = time.perf_counter()
        cube = _vol_v2_cube(normalise(volume), volume.spacing)
        rows.append({"fit": "vol-v2 cube 128^3 (retired)", "budget": 128**3, "shape": list(cube.shape),
                     "spacing_mm": [round(float(max(np.array(SHAPE) * SPACING)) / 128, 3)] * 3,
                     "fit_s": time.perf_counter() - started,
                     **(_encode(encoder, cube) if 128**3 in encode_budgets else {})})
        for budget in (int(b) for b in args.budgets.split(",") if b):
            started = time.perf_counter()
            fitted = fit_volume(volume, max_voxels=budget)
            row = {"fit": "vol-v3", "budget": budget, "shape": list(fitted.voxels.shape),
                   "spacing_mm": [round(s, 3) for s in fitted.spacing], "fit_s": time.perf_counter() - started}
            if budget in encode_budgets:
                row.update(_encode(encoder, fitted.voxels))
            rows.append(row)
    precision = encoder.precision_label
    print(f"{SHAPE} voxels of {SPACING} mm CT phantom; load {load_s:.1f} s; encode {precision}, "
          f"windows of {encoder.settings.model.volume_roi}")
    print(f"  {'fit':28} {'budget':>9} {'model input':>16} {'mm/voxel':>20} {'fit s':>7} {'encode s':>9}")
    for row in rows:
        encode = f"{row['encode_s']:.1f}" if "encode_s" in row else "-"
        print(f"  {row['fit']:28} {row['budget']:>9} {'x'.join(map(str, row['shape'])):>16} "
              f"{'x'.join(map(str, row['spacing_mm'])):>20} {row['fit_s']:>7.2f} {encode:>9}")
    result = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpu_bf16": cpu_has_bf16(), "threads": torch.get_num_threads(), "precision": precision,
              "volume": {"shape": list(SHAPE), "spacing_mm": list(SPACING)}, "load_s": load_s, "rows": rows}
    print(f"wrote {write_result(args.out, 'volumes', result)}")


def _encode(encoder: MedVAEEncoder, voxels: np.ndarray) -> dict[str, float]:
    started = time.perf_counter()
    z = encoder.encode(voxels[None])
    return {"encode_s": time.perf_counter() - started, "latent": list(z.shape[1:])}


if __name__ == "__main__":
    main()
