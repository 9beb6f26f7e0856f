"""Every route through the ASGI app (TestClient), random seeded weights, tiny images."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import make_archive, synthetic_image, tiny_settings, write_png
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.service import SpaceService

SEED_CARD = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_6b595dc0430858fc.txt"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("api")
    files = make_archive(root / "archive", studies=3, per_study=2)
    return root, files


def _client(root: Path, data: str = "data", **overrides: object) -> Iterator[TestClient]:
    settings = tiny_settings(root / data, **overrides)
    service = SpaceService(settings)
    if service.store.counts()["images"] == 0:
        IngestPipeline(service).run(root / "archive")
    with TestClient(create_app(settings, service=service)) as client:
        yield client


@pytest.fixture(scope="module")
def client(archive: tuple[Path, list[Path]]) -> Iterator[TestClient]:
    yield from _client(archive[0])


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_search_by_upload(client: TestClient, archive: tuple[Path, list[Path]]) -> None:
    query = archive[1][2]
    response = client.post("/v1/search", files={"file": ("q.png", _png_bytes(query), "image/png")}, data={"k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["weights"] == "fake-encoder" and body["took_ms"] > 0
    top = body["results"][0]
    assert top["study"]["label"] == "study_1" and top["score"] > 0.9999
    assert top["images"][0]["preview_url"].endswith(f"/v1/images/{top['images'][0]['image_id']}/preview.png")
    assert len(body["results"]) == 2


def test_search_json_base64_id_and_inline_previews(client: TestClient, archive: tuple[Path, list[Path]]) -> None:
    encoded = base64.b64encode(_png_bytes(archive[1][0])).decode()
    by_b64 = client.post("/v1/search", json={"image_base64": encoded, "k": 1, "previews": "inline"}).json()
    image = by_b64["results"][0]["images"][0]
    assert Image.open(io.BytesIO(base64.b64decode(image["preview_png_base64"]))).size == (64, 64)
    by_id = client.post("/v1/search", json={"image_id": image["image_id"], "k": 3, "group_by": "image"}).json()
    assert by_id["results"][0]["images"][0]["image_id"] == image["image_id"] and len(by_id["results"]) == 3
    filtered = client.post("/v1/search", json={"image_id": 1, "filters": {"modality": ["CT"]}}).json()
    assert filtered["results"] == []


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"image_id": 1, "image_base64": "aGk="}, 400, "exactly one"),
        ({"k": 3}, 400, "give exactly one"),
        ({"image_base64": "%%%"}, 400, "not valid base64"),
        ({"image_base64": base64.b64encode(b"not an image at all").decode()}, 422, "not a recognised image"),
        ({"image_id": 999999}, 404, "does not exist"),
        ({"image_id": 1, "k": 0}, 422, "k"),
        ({"image_url": "file:///etc/passwd"}, 400, "only http"),
        ({"image_url": "http://127.0.0.1:9/x.png"}, 400, "non-public"),
        ({"image_url": "http://localhost/x.png"}, 400, "non-public"),
        ({"image_url": "http://169.254.169.254/latest/meta-data"}, 400, "non-public"),
        ({"image_url": "http://10.0.0.1/x.png"}, 400, "non-public"),
    ],
)
def test_search_errors_have_one_shape(client: TestClient, body: dict, status: int, fragment: str) -> None:
    response = client.post("/v1/search", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "detail"} and fragment in error["message"]


def test_redirect_to_private_address_is_refused(archive: tuple[Path, list[Path]]) -> None:
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/internal.png")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for client in _client(archive[0], url_allow_hosts="127.0.0.1"):
            url = f"http://127.0.0.1:{server.server_port}/start.png"
            response = client.post("/v1/search", json={"image_url": url})
            assert response.status_code == 400 and "10.0.0.1" in response.json()["error"]["message"]
    finally:
        server.shutdown()


class _Drip(BaseHTTPRequestHandler):
    """Answers 200 and then one byte every 0.2 s for 30 s: a server that never quite times out a read."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(150):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client gave up: what the test wants
            return

    def log_message(self, *args: object) -> None:
        return


def test_slow_urls_have_a_total_deadline_and_cannot_starve_the_server(archive: tuple[Path, list[Path]]) -> None:
    """Issue 17.3: a dripping image_url ends at the fetch deadline; at most 8 fetches run; /healthz answers meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.query.fetch import MAX_CONCURRENT_FETCHES

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/slow.png"
    try:
        for client in _client(archive[0], url_allow_hosts="127.0.0.1", url_fetch_timeout=2.0):
            with ThreadPoolExecutor(MAX_CONCURRENT_FETCHES + 1) as pool:
                started = time.monotonic()
                pending = [pool.submit(client.post, "/v1/search", json={"image_url": url})
                           for _ in range(MAX_CONCURRENT_FETCHES + 1)]
                time.sleep(0.5)
                assert client.get("/healthz").status_code == 200  # while every fetch slot is taken
                answers = [future.result() for future in pending]
                elapsed = time.monotonic() - started
            codes = sorted(answer.status_code for answer in answers)
            assert codes == [400] * MAX_CONCURRENT_FETCHES + [503], codes
            busy = next(answer for answer in answers if answer.status_code == 503)
            assert busy.json()["error"]["code"] == "busy"
            timed_out = next(answer for answer in answers if answer.status_code == 400)
            assert "did not finish within 2 s" in timed_out.json()["error"]["message"]
            assert elapsed < 10, elapsed  # the drip lasts 30 s; a per-read timeout would wait for all of it
    finally:
        server.shutdown()


def test_a_lone_surrogate_in_a_url_is_a_clear_400(client: TestClient) -> None:
    """Issue 17.5: the refusal echoes the URL without failing to encode it."""
    body = rb'{"image_url": "http://127.0.0.1/\ud800"}'  # JSON text may carry a lone surrogate escape
    response = client.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["detail"]["url"] == "http://127.0.0.1/\\ud800"


def test_deeply_nested_json_is_a_400_with_the_error_shape(client: TestClient) -> None:
    """Issue 17.4: 1000 nested lists in a 2 KB body (JSON or a multipart `filters` field) never make a 500."""
    nested = "[" * 1000 + "]" * 1000
    body = '{"image_id": 1, "filters": {"modality": ' + nested + "}}"
    for route in ("/v1/search", "/v1/similarity-map", "/score"):
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "error" in response.json(), (route, response.text)
    form = client.post("/v1/search", data={"image_id": "1", "filters": '{"modality": ' + nested + "}"},
                       files={"file": ("q.png", b"", "image/png")})
    assert form.status_code == 400 and form.json()["error"]["detail"]["field"] == "filters"


def test_unknown_fields_and_filter_keys_are_422_naming_them(client: TestClient) -> None:
    """Issue 16.1: a typo never widens a cohort silently; the error names the key and the valid ones."""
    cases = [
        ("/v1/search", {"image_id": 1, "filters": {"label": ["nodule"]}}, "filters", "`label`"),
        ("/v1/search", {"image_id": 1, "filters": {"bodypart": ["CHEST"]}}, "filters", "`bodypart`"),
        ("/v1/search", {"image_id": 1, "more_like": [8]}, "", "`more_like`"),
        ("/v1/similarity-map", {"image_id": 1, "target_image_id": 2, "colour": "red"}, "", "`colour`"),
        ("/score", {"input_data": {"columns": ["image_path"], "data": [], "rows": 1}}, "input_data", "`rows`"),
        ("/v1/ingest-jobs", {"source": "/x", "priority": 1}, "", "`priority`"),
    ]
    for route, body, field, name in cases:
        response = client.post(route, json=body)
        assert response.status_code == 422, (route, body, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and name in error["message"], error
        assert error["detail"]["errors"][0]["field"] == field
    labels = client.post("/v1/search", json={"image_id": 1, "filters": {"label": ["nodule"]}}).json()["error"]
    assert "valid: modality, body_part" in labels["message"] and "labels" in labels["message"]
    form = client.post("/v1/search", data={"topk": "3"}, files={"file": ("q.png", b"not read", "image/png")})
    assert form.status_code == 422 and "`topk`" in form.json()["error"]["message"]
    assert client.post("/v1/search", json={"image_id": 1, "filters": {"labels": ["x"]}}).status_code == 200


def test_api_image_json_is_the_one_result_shape(client: TestClient) -> None:
    """Issue 16.2: the API's image JSON carries every field of the core's shape (the CLI's --json), UIDs included."""
    from retrieval.query.results import ImageResult

    found = client.post("/v1/search", json={"image_id": 1, "k": 2, "previews": "url"}).json()
    image = found["results"][0]["images"][0]
    assert set(image) == set(ImageResult.model_fields)  # previews: a URL here, base64 with previews=inline
    assert {"series_uid", "sop_uid", "patient_sex", "patient_age"} <= set(image)


def test_empty_results_name_the_filter_and_exclusion_falls_back_to_the_study(client: TestClient) -> None:
    """Issue 16.5: say which filter removed everything; "exclude same patient" without a patient id
    excludes the query's own study instead, and says so."""
    empty = client.post("/v1/search", json={"image_id": 1, "filters": {"modality": ["MR"], "labels": ["x"]}}).json()
    assert empty["results"] == []
    assert any("modality=MR keeps 0" in w and "labels=x keeps 0" in w for w in empty["warnings"]), empty["warnings"]
    own_study = client.get("/v1/images/1").json()["study"]["study_id"]
    excluded = client.post("/v1/search", json={"image_id": 1, "exclude_same_patient": True, "k": 10}).json()
    assert excluded["results"] and own_study not in [r["study"]["study_id"] for r in excluded["results"]]
    assert any("its own study is excluded" in w for w in excluded["warnings"])


def test_study_image_preview_latent_spaces(client: TestClient) -> None:
    image = client.get("/v1/images/1").json()
    assert image["image_id"] == 1 and image["weights"] == "fake-encoder"
    study = client.get(f"/v1/studies/{image['study']['study_id']}").json()
    assert [i["image_id"] for i in study["images"]] == [1, 2]
    preview = client.get("/v1/images/1/preview.png")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    assert "max-age" in preview.headers["cache-control"] and "reconstruction" in preview.headers["x-preview-note"]
    assert Image.open(io.BytesIO(preview.content)).size == (64, 64)
    assert client.get("/v1/images/1/preview.png").content == preview.content  # cached, same bytes
    latent = np.load(io.BytesIO(client.get("/v1/images/1/latent.npy").content))
    assert latent.shape == (4, 8, 8) and latent.dtype == np.float16
    spaces = client.get("/v1/spaces").json()
    assert len(spaces) == 1 and spaces[0]["active"] and spaces[0]["images"] == 6 and spaces[0]["weights"] == "fake-encoder"
    for path in ("/v1/images/999", "/v1/studies/999", "/v1/images/999/preview.png", "/v1/images/999/latent.npy"):
        missing = client.get(path)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert "999 does not exist" in missing.json()["error"]["message"]  # issue 16.11: not "no stored latent"
    compared = client.post("/v1/similarity-map", json={"image_id": 1, "target_image_id": 999})
    assert compared.status_code == 404 and "image 999 does not exist" in compared.json()["error"]["message"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["index_consistent"] is True


CARD_EXAMPLE = Path(__file__).parent / "fixtures" / "medvae_card_example.py"


def _card_processing_function():  # type: ignore[no-untyped-def]
    """The endpoint card's own ``process_medvae_output`` (vendored verbatim from the seed card)."""
    namespace: dict[str, object] = {}
    exec(CARD_EXAMPLE.read_text(), namespace)  # noqa: S102 - the card's published example, run as a user would
    return namespace["process_medvae_output"]


def test_vendored_card_example_matches_the_seed_card() -> None:
    if not SEED_CARD.exists():  # the seed lives beside the checkout (CI has it); a plain clone may not
        return
    card = SEED_CARD.read_text(encoding="utf-8", errors="replace")
    code = re.search(r"```python\n(.*?)```", card, re.S)
    assert code and code.group(1) in CARD_EXAMPLE.read_text()


@pytest.fixture(scope="module")
def medvae_client(archive: tuple[Path, list[Path]]) -> Iterator[TestClient]:
    """A server on real MedVAE (seeded random weights): /score is checked with the card's own code on it."""
    yield from _client(archive[0], data="data-medvae", weights="random")


@pytest.mark.parametrize("decode", [True, False])
def test_score_accepts_the_card_request(
    medvae_client: TestClient, archive: tuple[Path, list[Path]], tmp_path: Path, decode: bool
) -> None:
    encoded = base64.b64encode(_png_bytes(archive[1][1])).decode()
    request = {"input_data": {"columns": ["image_path", "decode"], "data": [[encoded, decode]]}}
    response = medvae_client.post("/score", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["weights"] == "random-init"
    prediction = body["predictions"][0]
    assert np.array(prediction["latent"]).shape == (4, 8, 8)
    assert ("decoded" in prediction and prediction["decoded"] is not None) == decode
    process = _card_processing_function()
    process(body, str(tmp_path / "out" / "result.png"))
    assert np.load(tmp_path / "out" / "result_latent.npy").shape == (4, 8, 8)
    assert (tmp_path / "out" / "result_decoded.png").exists() == decode
    if decode:
        assert Image.open(tmp_path / "out" / "result_decoded.png").size == (64, 64)


def test_score_refuses_local_paths(client: TestClient) -> None:
    request = {"input_data": {"columns": ["image_path", "decode"], "data": [["/etc/hostname", False]]}}
    response = client.post("/score", json=request)
    assert response.status_code == 400 and "local paths are never read" in response.json()["error"]["message"]


def test_api_keys_protect_every_route_but_healthz(archive: tuple[Path, list[Path]]) -> None:
    for client in _client(archive[0], api_keys="k1,k2"):
        public = {"/healthz", "/"}
        routes = [
            (method, re.sub(r"\{[^}]+\}", "1", path))
            for path, operations in client.app.openapi()["paths"].items()
            if path not in public
            for method in operations
        ]
        assert len(routes) >= 13  # every API route is listed from the app itself, new ones included
        routes += [("get", path) for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")]  # 17.9
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] == "unauthorized"
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/images/1", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert "paths" in client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).json()


def test_body_cap_gives_413(archive: tuple[Path, list[Path]]) -> None:
    for client in _client(archive[0], max_request_bytes=2048):
        response = client.post("/v1/search", files={"file": ("big.png", b"x" * 5000, "image/png")})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_streamed_body_without_length_is_capped(archive: tuple[Path, list[Path]]) -> None:
    for client in _client(archive[0], max_request_bytes=2048):
        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b"{" + b" " * 1000
        for route in ("/v1/search", "/score", "/v1/ingest-jobs", "/v1/similarity-map"):  # issue 17.8: every route
            response = client.post(route, content=chunks(), headers={"content-type": "application/json"})
            assert "content-length" not in response.request.headers
            assert response.status_code == 413, (route, response.text)
            assert response.json()["error"] == {"code": "payload_too_large", "detail": {"max_request_bytes": 2048},
                                                "message": "request body is larger than 2048 bytes"}


def test_ingest_job_routes(archive: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, _ = archive
    for client in _client(root):
        disabled = client.post("/v1/ingest-jobs", json={"source": str(root / "archive")})
        assert disabled.status_code == 403 and "RETRIEVAL_INGEST_ROOTS" in disabled.json()["error"]["message"]
    allowed = tmp_path / "allowed"
    (allowed / "folder").mkdir(parents=True)
    (allowed / "escape").symlink_to(root / "archive")
    for client in _client(root, ingest_roots=str(allowed)):
        escape = client.post("/v1/ingest-jobs", json={"source": str(allowed / "escape")})
        assert escape.status_code == 403, "a symlink out of the root is outside it"
        dotdot = client.post("/v1/ingest-jobs", json={"source": str(allowed / ".." / "allowed" / ".." )})
        assert dotdot.status_code == 403
        missing = client.post("/v1/ingest-jobs", json={"source": str(allowed / "nope")})
        assert missing.status_code == 400 and "no such file or folder" in missing.json()["error"]["message"]
        assert client.post("/v1/ingest-jobs", json={}).status_code == 422
        for odd in ("~no-such-user-here/x", str(allowed / ("n" * 300))):  # found by the OpenAPI fuzz test
            refused = client.post("/v1/ingest-jobs", json={"source": odd})
            assert refused.status_code in (400, 403) and refused.json()["error"]["detail"]["field"] == "source"
        unknown = client.post("/v1/ingest-jobs", json={"source": str(allowed / "folder"), "model": "medvae_9_9_2d"})
        assert unknown.status_code == 422 and "unknown model" in unknown.text
        volumes = client.post("/v1/ingest-jobs", json={"source": str(allowed / "folder"), "model": "medvae_4_1_3d"})
        assert volumes.status_code == 202 and volumes.json()["model"] == "medvae_4_1_3d"
        assert client.delete(f"/v1/ingest-jobs/{volumes.json()['job_id']}").status_code == 200
        job = client.post("/v1/ingest-jobs", json={"source": str(allowed / "folder")})
        assert job.status_code == 202 and job.json()["state"] == "queued" and job.json()["failures"] == []
        assert job.json()["model"] == "medvae_8_4_2d"  # the server's model by default
        assert job.json()["weights"] == "fake-encoder"
        job_id = job.json()["job_id"]
        listed = client.get("/v1/ingest-jobs").json()["jobs"]
        assert [j["job_id"] for j in listed][0] == job_id and len(listed) == 2
        fetched = client.get(f"/v1/ingest-jobs/{job_id}").json()
        assert fetched["source"] == str((allowed / "folder").resolve()) and fetched["counts"]["ingested"] == 0
        cancelled = client.delete(f"/v1/ingest-jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        again = client.delete(f"/v1/ingest-jobs/{job_id}")
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        assert client.get("/v1/ingest-jobs/0123").status_code == 404
        assert client.delete("/v1/ingest-jobs/0123").status_code == 404


def test_ingest_jobs_read_nothing_outside_the_roots(archive: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Issue 17.6: links out of a root and manifest rows with `../` or absolute paths are per-file failures."""
    from retrieval.ingest.worker import Worker

    root, files = archive
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_png(outside / "secret.png", synthetic_image(901))
    write_png(allowed / "cxr" / "inside.png", synthetic_image(902))
    (allowed / "cxr" / "link.png").symlink_to(outside / "secret.png")
    (allowed / "jobs2").mkdir()
    (allowed / "jobs2" / "manifest.csv").write_text(
        f"path\n../../outside/secret.png\n{files[0]}\n../cxr/inside.png\n"
    )
    for client in _client(root, data="roots-data", ingest_roots=str(allowed)):
        service = client.app.state.spaces.default
        ids = [client.post("/v1/ingest-jobs", json={"source": str(allowed / name)}).json()["job_id"]
               for name in ("cxr", "jobs2/manifest.csv")]
        assert Worker(service, poll_seconds=0.1).run(once=True) == 2
        folder, manifest = (client.get(f"/v1/ingest-jobs/{job_id}").json() for job_id in ids)
        assert folder["state"] == manifest["state"] == "succeeded"
        assert folder["counts"]["failed"] == 1 and "outside the allowed ingest roots" in folder["failures"][0]["reason"]
        assert folder["failures"][0]["source"].endswith("link.png")
        assert manifest["counts"]["failed"] == 2 and all(
            "outside the allowed ingest roots" in failure["reason"] for failure in manifest["failures"]
        )
        stored = {Path(image.source_uri).name for chunk in service.store.iter_images() for image in chunk}
        assert "secret.png" not in stored and "inside.png" in stored


def test_metrics_report_routes_timings_and_archive(client: TestClient, archive: tuple[Path, list[Path]]) -> None:
    client.post("/v1/search", files={"file": ("q.png", archive[1][0].read_bytes(), "image/png")}, data={"k": "1"})
    client.get("/v1/images/1")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'medvae_http_request_duration_seconds_count{method="POST",route="/v1/search",status="200"}' in text
    assert 'route="/v1/images/{image_id}"' in text  # route templates, never raw URLs
    encodes = re.search(r"^medvae_encode_seconds_count (\S+)$", text, re.M)
    searches = re.search(r"^medvae_index_search_seconds_count (\S+)$", text, re.M)
    assert encodes and float(encodes.group(1)) >= 1 and searches and float(searches.group(1)) >= 1
    assert 'medvae_archive_rows{table="images"} 6.0' in text
    assert "medvae_index_vectors 6.0" in text


def test_similarity_map_and_info(client: TestClient, archive: tuple[Path, list[Path]]) -> None:
    info = client.get("/v1/info").json()
    assert info["random_weights"] is True and "NOT MedVAE" in info["warning"]
    assert info["space"]["pooling"] == "spp:1,2,4" and info["max_request_bytes"] > 0
    same = client.post("/v1/similarity-map", json={"image_id": 3, "target_image_id": 3}).json()
    assert same["grid"]["rows"] == same["grid"]["cols"] == 8  # 64 px input / 8
    assert np.allclose(same["grid"]["cells"], 1.0, atol=1e-3) and same["score"] > 0.9999
    upload = client.post("/v1/similarity-map", files={"file": ("q.png", archive[1][0].read_bytes(), "image/png")},
                         data={"target_image_id": "4"})
    assert upload.status_code == 200, upload.text
    body = upload.json()
    cells = np.array(body["grid"]["cells"])
    assert cells.shape == (8, 8) and cells.min() < 0.999 and cells.max() <= 1.0
    assert body["target_preview_url"] == "/v1/images/4/preview.png" and "reconstruction" in body["note"]
    assert Image.open(io.BytesIO(base64.b64decode(body["query_preview_png_base64"]))).size == (64, 64)
    search = client.post("/v1/search", json={"image_id": 4, "k": 1, "group_by": "image"}).json()
    first = archive[1][0]
    by_upload = client.post("/v1/search", files={"file": ("q.png", first.read_bytes(), "image/png")},
                            data={"k": "6", "group_by": "image"}).json()
    score_of_4 = next(i["score"] for r in by_upload["results"] for i in r["images"] if i["image_id"] == 4)
    assert abs(body["score"] - score_of_4) < 1e-4  # the map's score is the search score
    assert search["results"][0]["images"][0]["image_id"] == 4
    missing = client.post("/v1/similarity-map", json={"image_id": 3, "target_image_id": 999})
    assert missing.status_code == 404
    assert client.post("/v1/similarity-map", json={"image_id": 3}).status_code == 422


def test_web_page_is_served_with_security_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "medvae-retrieval" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "content-security-policy" in script.headers
    assert "http://" not in script.text and "https://" not in script.text  # no CDN, works offline
