"""Export round-trips: what `.npz` shards and HDF5 hold equals what the archive stores; the probe example runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from conftest import make_archive, tiny_settings

from retrieval.ingest.pipeline import IngestPipeline
from retrieval.ops.export import export_latents
from retrieval.service import SpaceService

REPO = Path(__file__).resolve().parents[1]


def test_npz_and_hdf5_round_trip_with_s2_and_labels(tmp_path: Path) -> None:
    files = make_archive(tmp_path / "archive", studies=6, per_study=2)
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,labels\n" + "".join(
        f"{f},{'effusion' if i // 2 % 2 else 'normal'}|cohort-a\n" for i, f in enumerate(files)))
    service = SpaceService(tiny_settings(tmp_path / "data"))
    assert IngestPipeline(service).run(manifest).ingested == 12
    out = tmp_path / "export"
    result = export_latents(service, out, shard_size=5, formats=("npz", "hdf5"), include_s2=True)
    assert result["images"] == 12 and result["shards"] == ["latents-00000.npz", "latents-00001.npz", "latents-00002.npz"]
    assert json.loads((out / "manifest.json").read_text())["arrays"]["s2"]["shape"] == [-1, 4, 8, 8]

    shards = [np.load(out / name) for name in result["shards"]]
    ids = np.concatenate([s["image_ids"] for s in shards])
    z = np.concatenate([s["z"] for s in shards])
    vectors = np.concatenate([s["vectors"] for s in shards])
    s2 = np.concatenate([s["s2"] for s in shards])
    for row, image_id in enumerate(ids.tolist()):
        stored = service.store.latent(image_id, service.space.encoder_key)
        np.testing.assert_array_equal(z[row], stored.astype(np.float16))  # z is stored as fp16: bit-exact
    np.testing.assert_array_equal(vectors, service.store.vectors_of(service.space.id, ids.tolist()))
    expected_s2 = service.encoder.s2_latent(torch.from_numpy(z.astype(np.float32))).numpy()
    np.testing.assert_allclose(s2.astype(np.float32), expected_s2, rtol=2e-3, atol=2e-3)

    with h5py.File(out / "latents.h5") as h5:
        np.testing.assert_array_equal(h5["image_ids"][:], ids)
        np.testing.assert_array_equal(h5["z"][:], z)
        np.testing.assert_array_equal(h5["vectors"][:], vectors)
        np.testing.assert_array_equal(h5["s2"][:], s2)
        metadata = [json.loads(row) for row in h5["metadata_json"][:]]
        assert json.loads(h5.attrs["manifest"])["images"] == 12
    rows = list(csv.DictReader((out / "metadata.csv").open()))
    assert [int(r["image_id"]) for r in rows] == ids.tolist() == [m["image_id"] for m in metadata]
    assert {frozenset(r["labels"].split("|")) for r in rows} == {frozenset({"effusion", "cohort-a"}), frozenset({"normal", "cohort-a"})}
    service.close()

    probe = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "probe.py"), str(out), "--label", "effusion",
                            "--features", "s2"], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert "features=s2 dim=256" in probe.stdout and "accuracy=" in probe.stdout
