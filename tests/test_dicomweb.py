"""Ingest from a real Orthanc over DICOMweb: sync, search, incremental re-sync, auth and outage."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cli_runner import run_cli
from conftest import synthetic_image, tiny_settings
from dicom_factory import write_dicom
from fastapi.testclient import TestClient
from orthanc_server import PASSWORD, USER, OrthancServer
from pydicom.data import get_testdata_file
from volume_factory import phantom_hu, write_ct_series

from api.main import create_app
from retrieval.config import Settings
from retrieval.domain.metadata import age_in_years, shifted_date
from retrieval.errors import ForbiddenError, InvalidRequestError, SourceUnavailableError
from retrieval.ingest.dicomweb import DicomwebQuery, DicomwebSource
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.ingest.worker import Worker
from retrieval.query.search import run_search
from retrieval.service import SpaceService
from retrieval.storage.jobs import allowed_job_source

BUNDLED = ("CT_small.dcm", "MR_small.dcm")  # ship inside pydicom; different studies, CT and MR


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.discard()


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"dicomweb_username": USER, "dicomweb_password": PASSWORD,
                                 "dicomweb_retries": 1, "dicomweb_backoff": 0.0}
    values.update(overrides)
    return tiny_settings(tmp_path / "data", **values)


def _xrays(folder: Path, count: int, *, first_seed: int) -> list[Path]:
    """Generated CR images, one study each, with sex and age set."""
    return [
        write_dicom(folder / f"cr{seed}.dcm", (synthetic_image(seed, size=64) * 4000).astype(np.uint16),
                    Modality="CR", PatientSex="F" if seed % 2 else "M", PatientAge=f"0{40 + seed}Y",
                    PatientID=f"P{seed}", StudyDate="20240105", BodyPartExamined="CHEST", ViewPosition="PA")
        for seed in range(first_seed, first_seed + count)
    ]


def _count_fetches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    fetched: list[str] = []
    real_fetch = DicomwebSource.fetch

    def counting_fetch(self: DicomwebSource, item, spool):  # noqa: ANN001, ANN202
        fetched.append(item.sop_uid)
        return real_fetch(self, item, spool)

    monkeypatch.setattr(DicomwebSource, "fetch", counting_fetch)
    return fetched


def test_sync_search_then_resync_fetches_only_new_instances(
    orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc.upload(*(Path(get_testdata_file(name)) for name in BUNDLED), *_xrays(tmp_path / "first", 3, first_seed=1))
    fetched = _count_fetches(monkeypatch)
    service = SpaceService(_settings(tmp_path))
    report = IngestPipeline(service).run(orthanc.dicomweb_source)
    assert (report.total, report.ingested, report.skipped, report.failed) == (5, 5, 0, 0), report.failures
    assert len(fetched) == 5

    images = [image for chunk in service.store.iter_images() for image in chunk]
    assert {image.modality for image in images} == {"CT", "MR", "CR"}
    for image in images:  # stored under the instance's WADO-RS URL, never a spool path
        assert image.source_uri.startswith(f"{orthanc.url}/dicom-web/studies/{image.study.study_uid}/series/")
        assert image.source_uri.endswith(f"/instances/{image.sop_uid}")
        top = run_search(service, image_id=image.id, k=1, group_by="image")["results"][0]
        assert top["images"][0]["image_id"] == image.id  # every instance retrieves itself first
    assert not list(service.settings.storage.spool_dir.glob("*/*")), "fetched files are removed"

    women = run_search(service, image_id=images[0].id, k=10, filter_pairs=["patient_sex=F", "age_from=40"])
    hits = [img for result in women["results"] for img in result["images"]]
    assert hits and {(img["patient_sex"], img["modality"]) for img in hits} == {("F", "CR")}
    assert all(age_in_years(img["patient_age"]) >= 40 for img in hits)
    ct = next(image for image in images if image.modality == "CT")
    for key, value in (("study_uid", ct.study.study_uid), ("series_uid", ct.series_uid), ("sop_uid", ct.sop_uid)):
        only = run_search(service, image_id=images[0].id, k=10, group_by="image", filter_pairs=[f"{key}={value}"])
        assert [r["images"][0]["image_id"] for r in only["results"]] == [ct.id], key

    orthanc.upload(*_xrays(tmp_path / "second", 2, first_seed=10))
    fetched.clear()
    again = IngestPipeline(service).run(orthanc.dicomweb_source)
    assert (again.total, again.ingested, again.skipped, again.failed) == (7, 2, 5, 0)
    assert len(fetched) == 2  # stored instances were skipped by SOPInstanceUID before any fetch
    assert service.store.counts()["images"] == 7
    service.close()


def test_filters_by_modality_and_study(orthanc: OrthancServer, tmp_path: Path) -> None:
    orthanc.upload(*(Path(get_testdata_file(name)) for name in BUNDLED), *_xrays(tmp_path / "x", 2, first_seed=3))
    service = SpaceService(_settings(tmp_path))
    only_cr = IngestPipeline(service).run(f"{orthanc.dicomweb_source}?modality=cr")
    assert (only_cr.total, only_cr.ingested) == (2, 2)
    ct_study = str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).StudyInstanceUID)
    one_study = IngestPipeline(service).run(f"{orthanc.dicomweb_source}?study={ct_study}")
    assert (one_study.total, one_study.ingested) == (1, 1)
    none_since = IngestPipeline(service).run(f"{orthanc.dicomweb_source}?since=2030-01-01")
    assert none_since.total == 0
    service.close()


def test_wrong_password_is_a_clear_error_and_stores_nothing(orthanc: OrthancServer, tmp_path: Path) -> None:
    orthanc.upload(Path(get_testdata_file("CT_small.dcm")))
    service = SpaceService(_settings(tmp_path, dicomweb_password="not-the-password"))
    with pytest.raises(SourceUnavailableError, match=r"refused the credentials \(HTTP 401\)") as raised:
        IngestPipeline(service).run(orthanc.dicomweb_source)
    assert "not-the-password" not in str(raised.value)
    assert service.store.counts()["images"] == 0
    service.close()


def test_orthanc_stopped_mid_sync_then_rerun_completes(
    orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc.upload(*_xrays(tmp_path / "x", 5, first_seed=20))
    real_fetch = DicomwebSource.fetch
    calls: list[str] = []

    def fetch_then_stop_orthanc(self: DicomwebSource, item, spool):  # noqa: ANN001, ANN202
        calls.append(item.sop_uid)
        if len(calls) == 3:
            orthanc.stop()  # the PACS goes away in the middle of the sync
        return real_fetch(self, item, spool)

    monkeypatch.setattr(DicomwebSource, "fetch", fetch_then_stop_orthanc)
    service = SpaceService(_settings(tmp_path, dicomweb_fetch_workers=1))
    first = IngestPipeline(service).run(orthanc.dicomweb_source)
    assert (first.ingested, first.failed) == (2, 3)
    assert {f.stage for f in first.failures} == {"fetch"}
    assert all(f.source.startswith(f"{orthanc.url}/dicom-web/studies/") for f in first.failures)

    with pytest.raises(SourceUnavailableError, match="could not be reached"):
        IngestPipeline(service).run(orthanc.dicomweb_source)  # still down: listing fails, nothing changes
    assert service.store.counts()["images"] == 2

    orthanc.start()
    rerun = IngestPipeline(service).run(orthanc.dicomweb_source)
    assert (rerun.ingested, rerun.skipped, rerun.failed) == (3, 2, 0)
    assert service.store.counts()["images"] == 5
    service.close()


def test_source_strings_are_checked_and_credentials_never_travel_in_urls(tmp_path: Path) -> None:
    query = DicomwebQuery.parse("dicomweb+https://pacs.example:443/dicom-web/?modality=dx,CR&since=2024-02-01&study=1.2")
    assert (query.base_url, query.modalities, query.studies, query.since) == (
        "https://pacs.example:443/dicom-web", ("CR", "DX"), ("1.2",), dt.date(2024, 2, 1))
    assert DicomwebQuery.parse(query.source_string()) == query
    for bad, field in [("dicomweb+http://user:pw@pacs/dicom-web", "source"), ("dicomweb+ftp://pacs/x", "source"),
                       ("dicomweb+http://pacs/x?since=yesterday", "since"), ("dicomweb+http://pacs/x?color=red", "source")]:
        with pytest.raises(InvalidRequestError) as raised:
            DicomwebQuery.parse(bad)
        assert raised.value.detail["field"] == field
        assert "pw@" not in raised.value.message

    settings = tiny_settings(tmp_path, dicomweb_allowed_urls="http://pacs.local:8042/dicom-web/")
    assert allowed_job_source("dicomweb+http://pacs.local:8042/dicom-web?modality=CR", settings) == (
        "dicomweb+http://pacs.local:8042/dicom-web?modality=CR")
    with pytest.raises(ForbiddenError):
        allowed_job_source("dicomweb+http://169.254.169.254/latest", settings)


def test_date_shift_is_per_patient_and_keeps_intervals() -> None:
    day = dt.date(2024, 3, 1)
    later = day + dt.timedelta(days=40)
    shifted = shifted_date(day, "PAT-1", secret="s", max_days=30)
    assert shifted != day and abs((shifted - day).days) <= 30
    assert shifted_date(later, "PAT-1", secret="s", max_days=30) - shifted == later - day
    offsets = {(shifted_date(day, f"PAT-{i}", secret="s", max_days=30) - day).days for i in range(50)}
    assert len(offsets) > 10  # patients get different offsets
    assert shifted_date(day, None, secret="s", max_days=30) == day
    assert shifted_date(day, "PAT-1", secret="s", max_days=0) == day
    assert [age_in_years(v) for v in ("045Y", "006M", "010D", "52", "", "abc")] == [45, 0.5, 10 / 365.25, 52, None, None]


def test_api_job_syncs_an_allowed_dicomweb_server_through_the_worker(orthanc: OrthancServer, tmp_path: Path) -> None:
    orthanc.upload(*_xrays(tmp_path / "x", 2, first_seed=30))
    settings = _settings(tmp_path, dicomweb_allowed_urls=f"{orthanc.url}/dicom-web")
    service = SpaceService(settings)
    with TestClient(create_app(settings, service=service)) as client:
        other = client.post("/v1/ingest-jobs", json={"source": "dicomweb+http://10.0.0.1:8042/dicom-web"})
        assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
        secret_url = f"dicomweb+http://{USER}:{PASSWORD}@127.0.0.1:{orthanc.port}/dicom-web"
        refused = client.post("/v1/ingest-jobs", json={"source": secret_url})
        assert refused.status_code == 400 and PASSWORD not in refused.text
        job = client.post("/v1/ingest-jobs", json={"source": f"{orthanc.dicomweb_source}?modality=CR"})
        assert job.status_code == 202, job.text
        assert Worker(service).run(once=True) == 1
        done = client.get(f"/v1/ingest-jobs/{job.json()['job_id']}").json()
        assert done["state"] == "succeeded" and done["counts"]["ingested"] == 2, done
        assert client.get("/v1/info").json()["dicomweb_sources"] == [f"{orthanc.url}/dicom-web"]
    service.close()


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)
def test_cli_sync_and_wrong_password(orthanc: OrthancServer, cli_env: dict[str, str], tmp_path: Path) -> None:
    orthanc.upload(*(Path(get_testdata_file(name)) for name in BUNDLED))
    env = dict(cli_env, RETRIEVAL_DICOMWEB_USERNAME=USER, RETRIEVAL_DICOMWEB_PASSWORD="wrong-password")
    refused = run_cli(env, "ingest", orthanc.dicomweb_source, "--no-progress", check=False)
    assert refused.returncode != 0 and "refused the credentials (HTTP 401)" in refused.stderr
    assert "wrong-password" not in refused.stdout + refused.stderr
    env["RETRIEVAL_DICOMWEB_PASSWORD"] = PASSWORD
    synced = json.loads(run_cli(env, "ingest", orthanc.dicomweb_source, "--modality", "MR", "--json", "--no-progress").stdout)
    assert (synced["total"], synced["ingested"], synced["failed"]) == (1, 1, 0)
    mixed = run_cli(env, "ingest", str(tmp_path), "--modality", "MR", check=False)
    assert mixed.returncode != 0 and "apply to dicomweb+http(s):// sources only" in mixed.stderr


def test_bearer_token_is_sent_and_a_refusal_names_the_token_setting(tmp_path: Path) -> None:
    seen: list[str | None] = []

    class Refusing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's hook name
            seen.append(self.headers.get("Authorization"))
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = tiny_settings(tmp_path, dicomweb_token="secret-token", dicomweb_retries=0)
        source = DicomwebSource(DicomwebQuery.parse(f"dicomweb+http://127.0.0.1:{server.server_port}/dicom-web"), settings)
        with pytest.raises(SourceUnavailableError, match=r"HTTP 403.*RETRIEVAL_DICOMWEB_TOKEN") as raised:
            source.list_items()
        assert "secret-token" not in raised.value.message
        assert seen == ["Bearer secret-token"]
    finally:
        server.shutdown()


def test_ct_series_sync_into_a_3d_space_one_volume_per_series(
    orthanc: OrthancServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = write_ct_series(tmp_path / "ct", phantom_hu(7, (32, 32, 8)), PatientID="P7", PatientSex="M")
    orthanc.upload(*series, *_xrays(tmp_path / "x", 1, first_seed=40))  # one CT series of 8 slices, one CR image
    fetched = _count_fetches(monkeypatch)
    service = SpaceService(_settings(tmp_path, model="medvae_4_1_3d", volume_max_voxels=32**3))
    report = IngestPipeline(service).run(orthanc.dicomweb_source)
    assert (report.total, report.ingested, report.failed) == (2, 1, 1), report.failures
    assert "at least 2 slices" in report.failures[0].reason  # the lone X-ray is not a volume
    assert len(fetched) == 9
    volume = next(image for chunk in service.store.iter_images() for image in chunk)
    assert (volume.kind, volume.frames, volume.modality, volume.patient_sex) == ("dicom-series", 8, "CT", "M")
    assert volume.source_uri == f"{orthanc.url}/dicom-web/studies/{volume.study.study_uid}/series/{volume.series_uid}"
    assert run_search(service, image_id=volume.id, k=1)["results"][0]["images"][0]["image_id"] == volume.id

    fetched.clear()
    again = IngestPipeline(service).run(f"{orthanc.dicomweb_source}?modality=CT")
    assert (again.total, again.ingested, again.skipped, again.failed) == (1, 0, 1, 0)
    assert fetched == []  # a stored series is skipped by SeriesInstanceUID before any fetch
    service.close()
