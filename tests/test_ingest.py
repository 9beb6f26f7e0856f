"""The ingest pipeline in-process: manifests, metadata, studies, failures, label filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import synthetic_image, write_png

from retrieval.config import Settings
from retrieval.domain.metadata import keyed_hash
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.query.search import run_search
from retrieval.service import SpaceService


def test_manifest_ingest_groups_labels_and_hashes(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "files"
    for i in range(4):
        write_png(root / f"f{i}.png", synthetic_image(10 + i))
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "path,study,labels,modality,patient_id,patient_name,PatientName,mrn,dob,site\n"
        "files/f0.png,S1,effusion|cardiomegaly,DX,PAT-1,Doe^John,Doe^John,MRN-771,1950-01-02,north\n"
        "files/f1.png,S1,effusion,DX,PAT-1,Doe^John,Doe^John,MRN-771,1950-01-02,north\n"
        "files/f2.png,S2,,CR,PAT-2,Roe^Jane,Roe^Jane,MRN-772,1961-03-04,south\n"
        f"{root / 'f3.png'},S3,cardiomegaly,DX,PAT-3,,,,,south\n"
        "files/missing.png,S4,,DX,,,,,,\n"
        ",S5,,,,,,,,\n"
    )
    service = SpaceService(settings.replaced(manifest_columns="site"))  # the one extra column the user keeps
    report = IngestPipeline(service).run(manifest)
    assert (report.ingested, report.skipped, report.failed) == (4, 0, 2)
    # issue 17: columns that may carry identifiers are dropped and named once (never their values)
    assert report.dropped_columns == ["PatientName", "dob", "mrn", "patient_name"]
    assert "manifest columns not stored: PatientName, dob, mrn, patient_name" in report.summary()
    reasons = {Path(f.source).name: f.reason for f in report.failures}
    assert "cannot read file" in reasons["missing.png"]
    assert any("empty `path`" in r for r in reasons.values())

    images = {Path(img.source_uri).name: img for chunk in service.store.iter_images() for img in chunk}
    assert images["f0.png"].labels == ["cardiomegaly", "effusion"]
    assert images["f0.png"].study_id == images["f1.png"].study_id != images["f2.png"].study_id
    assert images["f0.png"].study.label == "S1" and images["f2.png"].modality == "CR"
    assert images["f0.png"].patient_hash == keyed_hash("PAT-1", settings.privacy.id_secret)
    assert images["f0.png"].extra == {"site": "north"}  # patient_name is never kept
    stored = repr([(i.extra, i.labels, i.study.label) for i in images.values()])
    assert "Doe" not in stored and "MRN-771" not in stored and "1950" not in stored

    query = root / "f0.png"
    effusion = run_search(service, path=query, k=10, filter_pairs=["label=effusion"])
    assert [r["study"]["label"] for r in effusion["results"]] == ["S1"]
    not_same_patient = run_search(service, image_id=images["f0.png"].id, k=10, exclude_same_patient=True)
    assert "S1" not in [r["study"]["label"] for r in not_same_patient["results"]]
    dx_only = run_search(service, path=query, k=10, filter_pairs=["modality=dx"])
    assert {r["images"][0]["modality"] for r in dx_only["results"]} == {"DX"}
    assert service.store.errors_of_run(report.run_id)[0].stage == "read"
    service.close()


def test_same_bytes_twice_in_one_run_is_stored_once(settings: Settings, tmp_path: Path) -> None:
    pixels = synthetic_image(5)
    write_png(tmp_path / "a" / "x.png", pixels)
    write_png(tmp_path / "b" / "x_copy.png", pixels)
    service = SpaceService(settings)
    report = IngestPipeline(service).run(tmp_path)
    assert (report.ingested, report.skipped) == (1, 1)
    assert service.store.counts()["images"] == 1
    assert np.isclose(run_search(service, path=tmp_path / "a" / "x.png", k=1)["results"][0]["score"], 1.0, atol=1e-4)


def test_a_file_that_fails_to_decode_never_hides_a_good_one_with_its_sop_uid(settings: Settings, tmp_path: Path) -> None:
    """Issue 17.1: `a_bad.dcm` (truncated pixels) and `b_good.dcm` share a SOPInstanceUID; the good one is stored."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder = tmp_path / "pair"
    folder.mkdir()
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    good.save_as(folder / "b_good.dcm")
    good.PixelData = good.PixelData[:100]
    good.save_as(folder / "a_bad.dcm")
    service = SpaceService(settings)
    report = IngestPipeline(service).run(folder)
    assert [Path(f.source).name for f in report.failures] == ["a_bad.dcm"] and report.ingested == 1
    again = IngestPipeline(service).run(folder)  # the instance is stored now: both files name it
    assert (again.ingested, again.skipped, again.failed) == (0, 2, 0)
    stored = [Path(img.source_uri).name for chunk in service.store.iter_images() for img in chunk]
    assert stored == ["b_good.dcm"]


def test_a_manifest_after_its_folder_updates_stored_images_without_reencoding(settings: Settings, tmp_path: Path) -> None:
    """Issue 16.3: folder first, then `labels.csv` for the same files: its metadata applies, `updated N`."""
    root = tmp_path / "cohort"
    for i in range(3):
        write_png(root / f"img{i}.png", synthetic_image(40 + i))
    service = SpaceService(settings.replaced(manifest_columns="site"))
    assert IngestPipeline(service).run(root).ingested == 3
    encoded = service.store.counts()
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,labels,modality,body_part,view,site\n"
                        "cohort/img0.png,effusion,CR,chest,PA,north\n"
                        "cohort/img1.png,nodule|effusion,CR,chest,AP,south\n"
                        "cohort/img2.png,,,,,\n")  # nothing to apply
    report = IngestPipeline(service).run(manifest)
    assert (report.ingested, report.skipped, report.updated, report.failed) == (0, 3, 2, 0)
    assert "updated 2" in report.summary()
    assert service.store.counts() == encoded  # nothing re-encoded or stored twice
    images = {Path(img.source_uri).name: img for chunk in service.store.iter_images() for img in chunk}
    assert (images["img1.png"].labels, images["img1.png"].modality, images["img1.png"].view) == (["effusion", "nodule"], "CR", "AP")
    assert images["img0.png"].body_part == "CHEST" and images["img0.png"].extra == {"site": "north"}
    effusion = run_search(service, image_id=images["img2.png"].id, k=10, filter_pairs=["label=effusion"], group_by="image")
    assert sorted(r["images"][0]["image_id"] for r in effusion["results"]) == sorted([images["img0.png"].id, images["img1.png"].id])
    assert IngestPipeline(service).run(manifest).updated == 0  # applying it again changes nothing


def test_a_long_scan_reports_its_progress(settings: Settings, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 16.9: while a large folder is listed the progress says how many files were found (not 0/?)."""
    import retrieval.ingest.pipeline as pipeline_module

    for i in range(3):
        write_png(tmp_path / "folder" / f"{i}.png", synthetic_image(60 + i))
    clock = iter(range(0, 10_000, 2))  # every look at the clock is two seconds later: a slow file system
    monkeypatch.setattr(pipeline_module.time, "monotonic", lambda: float(next(clock)))
    seen: list[tuple[str, int]] = []
    IngestPipeline(SpaceService(settings), progress=lambda report: seen.append((report.phase, report.total))).run(
        tmp_path / "folder"
    )
    scanning = [total for phase, total in seen if phase == "scanning"]
    assert scanning == [1, 2, 3] and ("ingesting", 3) in seen


def test_a_batch_whose_quality_scoring_fails_is_reported_and_the_run_goes_on(
    settings: Settings, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """`--quality` scoring runs inside the batch's guarded step (as on Ray): one failing batch never stops an ingest."""
    import retrieval.ingest.pipeline as pipeline

    root = tmp_path / "files"
    for i in range(4):
        write_png(root / f"f{i}.png", synthetic_image(30 + i))
    real = pipeline.score_latents
    calls = []

    def second_batch_fails(service, z, pixels):  # type: ignore[no-untyped-def]
        calls.append(len(z))
        if len(calls) == 2:
            raise RuntimeError("scoring broke")
        return real(service, z, pixels)

    monkeypatch.setattr(pipeline, "score_latents", second_batch_fails)
    service = SpaceService(settings.replaced(batch_size=2, ingest_quality=True, decode_workers=0))
    report = IngestPipeline(service).run(root)
    assert (report.ingested, report.failed) == (2, 2), report.summary()
    assert {f.stage for f in report.failures} == {"encode"} and "scoring broke" in report.failures[0].reason
    assert service.store.counts()["images"] == 2 and "quality" in report.seconds
    service.close()


def test_queries_fitted_on_the_encoders_device_find_what_the_cpu_fit_finds(settings: Settings, tmp_path: Path) -> None:
    """RETRIEVAL_QUERY_FIT_DEVICE=encoder (auto on a GPU): the same hits and scores as the Pillow fit, batched or not."""
    import torch

    from retrieval.imaging.decode import decode_path

    root = tmp_path / "files"
    for i in range(5):
        write_png(root / f"f{i}.png", synthetic_image(50 + i, size=300))
    IngestPipeline(SpaceService(settings)).run(root)
    found = {}
    for fit, batching in (("cpu", "off"), ("encoder", "off"), ("encoder", "on")):
        service = SpaceService(settings.replaced(query_fit_device=fit, query_batching=batching))
        fitted = service.query_input(decode_path(root / "f2.png", max_pixels=10**8))
        assert isinstance(fitted, torch.Tensor) == (fit == "encoder")
        hits = run_search(service, path=root / "f2.png", k=5, group_by="image")["results"]
        found[fit, batching] = [(r["images"][0]["image_id"], r["images"][0]["score"]) for r in hits]
        service.close()
    reference = found["cpu", "off"]
    for other in (found["encoder", "off"], found["encoder", "on"]):
        assert [i for i, _ in other] == [i for i, _ in reference]
        assert np.allclose([s for _, s in other], [s for _, s in reference], atol=1e-5)


def test_ingest_fitted_on_the_encoders_device_stores_what_the_cpu_fit_stores(settings: Settings, tmp_path: Path) -> None:
    """RETRIEVAL_INGEST_FIT_DEVICE=encoder (auto on a GPU): decode workers hand over stored integers (in shared
    memory), the pipeline maps and fits them on the encoder's device; the vectors equal the CPU path's."""
    from dicom_factory import write_dicom
    from PIL import Image

    root = tmp_path / "files"
    for i in range(6):
        write_png(root / f"p{i}.png", synthetic_image(70 + i, size=300), bits=16)
    for i in range(3):
        raw = (synthetic_image(80 + i, size=260) * 3000).astype(np.uint16)
        write_dicom(root / f"d{i}.dcm", raw, slope=1, intercept=-1024, window=(600, 2400),
                    photometric="MONOCHROME1" if i == 0 else "MONOCHROME2")
    Image.fromarray((synthetic_image(90, size=200) * 255).astype(np.uint8)).convert("RGB").save(root / "rgb.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    vectors, reports = {}, {}
    for fit, workers in (("cpu", 2), ("encoder", 2), ("encoder", 0)):
        service = SpaceService(settings.replaced(data_dir=tmp_path / f"{fit}-{workers}", ingest_fit_device=fit,
                                                 decode_workers=workers))
        reports[fit, workers] = report = IngestPipeline(service).run(root)
        assert (report.ingested, report.failed) == (10, 1), report.failures
        images = service.store.images_by_sha256([img.sha256 for chunk in service.store.iter_images() for img in chunk])
        matrix = service.store.vectors_of(service.space.id, [image.id for image in images])
        vectors[fit, workers] = {image.sha256: row for image, row in zip(images, matrix, strict=True)}
        service.close()
    assert reports["cpu", 2].device_frames == 0
    for key in (("encoder", 2), ("encoder", 0)):
        assert reports[key].device_frames == 9  # the PNGs and DICOMs; the RGB PNG is mapped and fitted by its worker
        assert vectors[key].keys() == vectors["cpu", 2].keys()
        for sha, vector in vectors["cpu", 2].items():
            assert np.allclose(vectors[key][sha], vector, atol=1e-4), sha
    assert 1 <= reports["encoder", 2].shared_frames <= 9 and reports["encoder", 0].shared_frames == 0
    assert reports["encoder", 2].as_dict()["device_fit"] == {"frames": 9, "shared_memory": reports["encoder", 2].shared_frames,
                                                             "device_decoded": 0, "device_decode_fallbacks": 0}


def test_decode_workers_default_to_every_spare_core_for_a_gpu_encoder_and_at_most_8_for_a_cpu_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from retrieval.ingest import pipeline

    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
    assert pipeline.decode_worker_count(-1, gpu_encoder=True) == 15  # the GPU machine: decoding is the bound
    assert pipeline.decode_worker_count(-1) == 8  # a CPU encoder is the bound: workers would only take its cores
    assert pipeline.decode_worker_count(4, gpu_encoder=True) == 4 and pipeline.decode_worker_count(0) == 0
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    assert pipeline.decode_worker_count(-1) == pipeline.decode_worker_count(-1, gpu_encoder=True) == 1
