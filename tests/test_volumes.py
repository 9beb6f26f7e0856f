"""CT/MR volumes with the MedVAE 3-D architecture (random seeded weights, volumes of at most 32^3 voxels)."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_archive, tiny_settings
from fastapi.testclient import TestClient
from PIL import Image
from volume_factory import phantom_hu, write_ct_series, write_nifti

from api.main import create_app
from retrieval.config import Settings
from retrieval.errors import ImageDecodeError, InvalidRequestError
from retrieval.imaging.volumes import (
    check_slice_spacing,
    load_nifti,
    load_volume,
    scan_volumes,
)
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.model.encoder import MedVAEEncoder
from retrieval.model.network import build_medvae_model
from retrieval.ops.export import export_latents
from retrieval.query.previews import preview_png
from retrieval.query.search import run_search
from retrieval.query.similarity import similarity_map
from retrieval.service import SpaceService

CUBE = 32


def volume_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"model": "medvae_4_1_3d", "volume_max_voxels": CUBE**3, "volume_roi": CUBE}
    values.update(overrides)
    return tiny_settings(tmp_path / "data", **values)


def test_3d_encoder_is_medvae_3d_with_fused_attention_and_posterior_mode(tmp_path: Path) -> None:
    encoder = MedVAEEncoder(volume_settings(tmp_path, volume_max_voxels=16**3, volume_roi=16, weights="random"))
    torch.manual_seed(0)
    reference = build_medvae_model(encoder.architecture, encoder.architecture.ddconfig, 1).eval()
    reference.load_state_dict(encoder.model.state_dict())
    assert type(reference).__module__ == "medvae.models.autoencoder_kl_3d"
    cube = np.random.default_rng(1).random((2, 16, 16, 16), dtype=np.float32)
    with torch.inference_mode():
        expected = reference.encode(torch.from_numpy(cube)[:, None] * 2 - 1).mode()
    z = encoder.encode(cube)
    assert z.shape == (2, 1, 4, 4, 4)
    assert torch.allclose(z, expected, atol=1e-4), (z - expected).abs().max()  # SDPA == medvae's bmm attention
    assert torch.equal(z, encoder.encode(cube))  # the mode, never a sample


def test_volume_vectors_pool_z_and_a_checkpoint_without_the_untrained_head_loads(tmp_path: Path) -> None:
    """Issue 13.3: medvae's 3-D latent is z (its 3-D stage-2 head is never trained), so 3-D vectors pool z;
    a 3-D checkpoint without that head's tensors loads, while a 2-D one missing them is refused."""
    from retrieval.errors import WeightsError
    from retrieval.model.network import save_state_dict
    from retrieval.model.pooling import pool

    service = SpaceService(volume_settings(tmp_path, volume_max_voxels=16**3, volume_roi=16, weights="random"))
    cube = np.random.default_rng(3).random((1, 16, 16, 16), dtype=np.float32)
    z, vectors = service.embed_pixels(cube)
    assert np.allclose(vectors, pool(z.float(), service.pooling).numpy(), atol=1e-6)
    assert not np.allclose(vectors, pool(service.encoder.s2_latent(z), service.pooling).numpy(), atol=1e-3)
    assert service.preprocessing.version == "vol-v3"  # older versions (vol-v1 pooled s2) keep their own spaces

    without_head = tmp_path / "vae_4x_1c_3D_no_head.ckpt"
    save_state_dict(service.encoder.model, without_head)
    state = torch.load(without_head, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith(("channel_ds.", "channel_proj."))}
    torch.save(state, without_head)
    loaded = MedVAEEncoder(volume_settings(tmp_path / "b", volume_max_voxels=16**3, volume_roi=16, weights=str(without_head)))
    assert torch.equal(loaded.encode(cube), z)
    flat = MedVAEEncoder(tiny_settings(tmp_path / "c", weights="random", runtime="torch"))
    flat_ckpt = tmp_path / "vae_8x_4c_2D_no_head.ckpt"
    save_state_dict(flat.model, flat_ckpt)
    state = torch.load(flat_ckpt, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("channel_proj.")}
    torch.save(state, flat_ckpt)
    with pytest.raises(WeightsError, match="missing"):
        MedVAEEncoder(tiny_settings(tmp_path / "d", weights=str(flat_ckpt), runtime="torch"))


def test_sliding_window_covers_cubes_larger_than_the_window(tmp_path: Path) -> None:
    encoder = MedVAEEncoder(volume_settings(tmp_path, volume_max_voxels=32 * 16 * 16, volume_roi=16, weights="random"))
    volume = np.random.default_rng(2).random((1, 32, 16, 16), dtype=np.float32)  # 3 overlapping windows along x
    z = encoder.encode(volume)
    assert z.shape == (1, 1, 8, 4, 4) and torch.isfinite(z).all()
    assert torch.equal(z, encoder.encode(volume))
    assert encoder.decode(z).shape == (1, 32, 16, 16)


def test_dicom_series_and_nifti_of_the_same_data_load_identically(tmp_path: Path) -> None:
    hu = np.round(np.clip(phantom_hu(3, (20, 24, 10)), -1024, 3000))  # (rows, cols, slices), as DICOM stores it
    write_ct_series(tmp_path / "series", hu)
    # the same voxels as NIfTI: x = column (towards patient left, i.e. -R), y = row (posterior, -A), z = slice
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu.transpose(1, 0, 2), affine), str(tmp_path / "same.nii.gz"))
    items = scan_volumes(tmp_path / "series")
    assert len(items) == 1 and not items[0].error
    from_dicom = load_volume(items[0], max_voxels=10**8)
    from_nifti = load_nifti(tmp_path / "same.nii.gz", max_voxels=10**8)
    assert from_dicom.modality == from_nifti.modality == "CT"
    assert from_dicom.spacing == from_nifti.spacing == (1.0, 1.0, 2.0)
    assert np.array_equal(from_dicom.voxels, from_nifti.voxels)


def test_inconsistent_slice_spacing_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"slice spacing is not uniform \(2.00 to 6.00 mm"):
        check_slice_spacing("s", np.array([0.0, 2.0, 4.0, 10.0, 12.0]))
    with pytest.raises(ImageDecodeError, match="same position"):
        check_slice_spacing("s", np.array([0.0, 2.0, 2.0, 4.0]))
    hu = phantom_hu(4, (16, 16, 6))
    write_ct_series(tmp_path / "gap", hu, slice_positions=[0, 2, 4, 8, 10, 12])
    item = scan_volumes(tmp_path / "gap")[0]
    with pytest.raises(ImageDecodeError) as raised:
        load_volume(item, max_voxels=10**8)
    assert raised.value.detail["reason"] == "inconsistent_spacing"
    with pytest.raises(ImageDecodeError, match="expected a 3-D volume"):
        load_nifti(write_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8, 2, 3), np.float32)), max_voxels=10**8)


def test_volumes_ingest_retrieve_themselves_and_preview_three_planes(tmp_path: Path) -> None:
    archive = tmp_path / "volumes"
    for seed in range(2):
        write_nifti(archive / f"subject{seed}.nii.gz", phantom_hu(10 + seed).transpose(1, 0, 2))
    for seed in range(2):
        write_ct_series(archive / f"ct{seed}", phantom_hu(20 + seed), PatientSex="F", PatientAge="061Y",
                        PatientID=f"P{seed}", BodyPartExamined="CHEST", StudyDate="20240301")
    write_ct_series(archive / "broken", phantom_hu(30, (32, 32, 6)), slice_positions=[0, 2, 4, 9, 11, 13])

    service = SpaceService(volume_settings(tmp_path))
    report = IngestPipeline(service).run(archive)
    assert (report.total, report.ingested, report.failed) == (5, 4, 1), report.failures
    assert "slice spacing is not uniform" in report.failures[0].reason and "broken" in report.failures[0].source
    assert service.space_info()["dims"] == 3 and service.space_info()["dim"] == 73  # spp 1,2,4 over a cube

    volumes = [image for chunk in service.store.iter_images() for image in chunk]
    assert sorted(v.kind for v in volumes) == ["dicom-series", "dicom-series", "nifti", "nifti"]
    for volume in volumes:  # one vector per series, and every volume retrieves itself first
        top = run_search(service, image_id=volume.id, k=4, group_by="image")["results"][0]
        assert top["images"][0]["image_id"] == volume.id
    series = next(v for v in volumes if v.kind == "dicom-series")
    assert (series.modality, series.patient_sex, series.body_part, series.sop_uid) == ("CT", "F", "CHEST", None)
    assert series.series_uid and series.source_uri.endswith(f"#{series.series_uid}")

    by_file = run_search(service, path=archive / "subject1.nii.gz", k=1)["results"][0]["images"][0]
    assert by_file["source"].endswith("subject1.nii.gz") and by_file["score"] == pytest.approx(1.0, abs=1e-4)
    by_folder = run_search(service, path=archive / "ct0", k=1)["results"][0]["images"][0]
    assert "/ct0#" in by_folder["source"] and by_folder["score"] == pytest.approx(1.0, abs=1e-4)

    # 32 x 32 x 24 voxels of 1 x 1 x 2 mm: the body fills the slices, so the crop grows to 32 x 32 x 32 at native
    # spacing (the budget is 32^3), stored with z; the preview shows millimetres true: its panels are 64 mm tall
    assert service.store.latent_spacings([series.id], service.space.encoder_key) == {series.id: (1.0, 1.0, 2.0)}
    assert service.stored_latent(series.id).shape == (1, 8, 8, 8)
    png = Image.open(io.BytesIO(preview_png(service, series.id)))
    assert png.size == (3 * CUBE, 2 * CUBE) and "sagittal, coronal and axial" in png.text["Description"]
    with pytest.raises(InvalidRequestError, match="compare 2-D images"):  # grids of volumes do not line up
        similarity_map(service, torch.from_numpy(service.stored_latent(series.id)), series.id)

    again = IngestPipeline(service).run(archive)
    assert (again.ingested, again.skipped, again.failed) == (0, 4, 1)

    # volumes' z differ in shape: the export is ragged, and gives every z and spacing back
    manifest = export_latents(service, tmp_path / "export", formats=("npz", "hdf5"))
    assert manifest["z_layout"].startswith("ragged") and manifest["images"] == 4
    shard = np.load(tmp_path / "export" / manifest["shards"][0])
    restored = np.split(shard["z"], np.cumsum(shard["z_shape"].prod(1))[:-1])
    for image_id, flat, shape, spacing in zip(shard["image_ids"], restored, shard["z_shape"], shard["spacing"],
                                              strict=True):
        assert np.array_equal(flat.reshape(shape), service.stored_latent(int(image_id)).astype(np.float16))
        assert tuple(spacing) == service.store.latent_spacings([int(image_id)], service.space.encoder_key)[int(image_id)]
    whole = service.whole_latents([service.stored_latent(v.id) for v in volumes])  # re-ranking / eval rows
    assert whole.shape == (4, 16**3)
    service.close()


def test_a_query_folder_with_two_series_is_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "pair" / "a", phantom_hu(1, (16, 16, 4)))
    write_ct_series(tmp_path / "pair" / "b", phantom_hu(2, (16, 16, 4)))
    service = SpaceService(volume_settings(tmp_path))
    with pytest.raises(InvalidRequestError, match=r"exactly one DICOM series \(found 2\)"):
        run_search(service, path=tmp_path / "pair", k=1)
    service.close()


def test_2d_and_3d_spaces_coexist_and_the_api_searches_either(tmp_path: Path) -> None:
    images_2d = make_archive(tmp_path / "xrays", studies=2, per_study=1)
    settings_2d = tiny_settings(tmp_path / "data")
    service_2d = SpaceService(settings_2d)
    assert IngestPipeline(service_2d).run(tmp_path / "xrays").ingested == 2
    for seed in range(2):
        write_nifti(tmp_path / "volumes" / f"subject{seed}.nii.gz", phantom_hu(40 + seed).transpose(1, 0, 2))
    service_3d = SpaceService(volume_settings(tmp_path))
    assert IngestPipeline(service_3d).run(tmp_path / "volumes").ingested == 2
    volume_id = next(image.id for chunk in service_3d.store.iter_images() for image in chunk if image.kind == "nifti")
    service_3d.close()

    with TestClient(create_app(settings_2d.replaced(volume_max_voxels=CUBE**3, volume_roi=CUBE),
                               service=service_2d)) as client:
        spaces = client.get("/v1/spaces").json()
        assert sorted((s["dims"], s["images"], s["active"]) for s in spaces) == [(2, 2, True), (3, 2, False)]
        volume_space = next(s["key"] for s in spaces if s["dims"] == 3)

        by_id = client.post("/v1/search", json={"image_id": volume_id, "k": 2, "space": volume_space[:12]})
        assert by_id.status_code == 200, by_id.text
        body = by_id.json()
        assert body["space"]["key"] == volume_space and body["results"][0]["images"][0]["image_id"] == volume_id
        preview = client.get(body["results"][0]["images"][0]["preview_url"])
        assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size == (3 * CUBE, 2 * CUBE)
        latent = client.get(f"/v1/images/{volume_id}/latent.npy", params={"space": volume_space})
        assert latent.headers["X-Voxel-Spacing-Mm"] == "1,1,2" and np.load(io.BytesIO(latent.content)).ndim == 4

        upload = (tmp_path / "volumes" / "subject1.nii.gz").read_bytes()
        by_file = client.post("/v1/search", files={"file": ("q.nii.gz", upload, "application/gzip")},
                              data={"space": volume_space, "k": "1"}).json()
        assert by_file["results"][0]["images"][0]["source"].endswith("subject1.nii.gz")

        default = client.post("/v1/search", files={"file": ("q.png", images_2d[0].read_bytes(), "image/png")},
                              data={"k": "1"}).json()
        assert default["space"]["dims"] == 2 and default["results"][0]["images"][0]["source"].endswith(images_2d[0].name)
        assert client.post("/v1/search", json={"image_id": volume_id}).status_code == 404  # not in the 2-D space
        assert client.post("/v1/search", json={"image_id": volume_id, "space": "ffffffffffff"}).status_code == 404
        assert client.post("/v1/search", json={"image_id": volume_id, "space": "ab"}).status_code == 422


def test_volume_scan_confined_to_roots_never_opens_a_file_outside(tmp_path: Path) -> None:
    """Issue 17.6 for 3-D jobs: a NIfTI or DICOM link leading out of the roots is a failed item."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_nifti(root / "inside.nii.gz", phantom_hu(1))
    write_ct_series(outside / "series", phantom_hu(2))
    (root / "scan.nii.gz").symlink_to(write_nifti(outside / "secret.nii.gz", phantom_hu(3)))
    (root / "slice.dcm").symlink_to(sorted((outside / "series").iterdir())[0])
    items = scan_volumes(root, roots=[root.resolve()])
    failed = sorted(Path(item.path).name for item in items if item.error)
    assert failed == ["scan.nii.gz", "slice.dcm"] and all("outside the allowed" in i.error for i in items if i.error)
    assert [Path(item.path).name for item in items if not item.error] == ["inside.nii.gz"]
    assert len(scan_volumes(root)) == 3  # a CLI ingest (no roots) follows the links as before


def test_fit_volume_is_medvaes_crop_at_native_spacing_within_the_budget(tmp_path: Path) -> None:
    """Issue 13.4: the model input is medvae's own (``load_ct_3d``: RAS, window, CropForeground(k_divisible=16),
    padded where the box leaves the volume) at native spacing; above the budget it shrinks, antialiased."""
    import warnings

    from medvae.utils.loaders import load_ct_3d

    from retrieval.imaging.preprocess import fit_volume
    from retrieval.ops.sample import synthetic_volume

    path = write_nifti(tmp_path / "ct.nii.gz", synthetic_volume("CT", (45, 38, 21)), spacing=(0.7, 0.7, 1.25))
    volume = load_nifti(path, max_voxels=10**8)
    fitted = fit_volume(volume, max_voxels=10**6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = load_ct_3d(str(path))[0].numpy()
    assert fitted.voxels.shape == expected.shape == (48, 32, 32) and fitted.spacing == (0.7, 0.7, 1.25)
    assert np.array_equal(fitted.voxels * 2.0 - 1.0, expected)
    assert fitted.box[0][1] > volume.voxels.shape[0]  # the body touches +x: the box leaves the volume (padded)

    small = fit_volume(volume, max_voxels=16 * 16 * 16 * 4)
    assert all(n % 16 == 0 for n in small.voxels.shape) and small.voxels.size <= 16**3 * 4
    assert small.spacing == pytest.approx(tuple(s * n / m for s, n, m in
                                                zip(fitted.spacing, fitted.voxels.shape, small.voxels.shape)))

    stripes = np.zeros((64, 32, 32), np.float32)
    stripes[::2] = 1000.0  # one-voxel stripes of MR signal: what naive subsampling aliases into bands
    striped = load_nifti(write_nifti(tmp_path / "stripes.nii.gz", stripes), max_voxels=10**8)
    reduced = fit_volume(striped, max_voxels=32 * 16 * 16).voxels
    assert reduced.shape == (32, 16, 16) and abs(float(reduced.mean()) - 0.5) < 0.05 and float(reduced.std()) < 0.1

    air = load_nifti(write_nifti(tmp_path / "air.nii.gz", np.full((20, 20, 10), -1000.0, np.float32)), max_voxels=10**8)
    assert fit_volume(air, max_voxels=10**6).voxels.shape == (32, 32, 16)  # nothing above 0 HU: the whole extent
