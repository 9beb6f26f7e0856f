"""Every route through the ASGI app (TestClient), random seeded weights, tiny images."""

from __future__ import annotations

import base64
import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from retrieval.ingest import IngestPipeline
from retrieval.service import RetrievalService

from conftest import make_archive, tiny_settings

SEED_CARD = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_6b595dc0430858fc.txt"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("api")
    files = make_archive(root / "archive", studies=3, per_study=2)
    return root, files


def _client(root: Path, **overrides: object) -> Iterator[TestClient]:
    settings = tiny_settings(root / "data", **overrides)
    service = RetrievalService(settings)
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
    assert body["model"]["weights"] == "random-init" and body["took_ms"] > 0
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


def test_study_image_preview_latent_spaces(client: TestClient) -> None:
    image = client.get("/v1/images/1").json()
    assert image["image_id"] == 1 and image["weights"] == "random-init"
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
    assert len(spaces) == 1 and spaces[0]["active"] and spaces[0]["images"] == 6 and spaces[0]["weights"] == "random-init"
    for path in ("/v1/images/999", "/v1/studies/999", "/v1/images/999/preview.png", "/v1/images/999/latent.npy"):
        missing = client.get(path)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


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


@pytest.mark.parametrize("decode", [True, False])
def test_score_accepts_the_card_request(client: TestClient, archive: tuple[Path, list[Path]], tmp_path: Path, decode: bool) -> None:
    encoded = base64.b64encode(_png_bytes(archive[1][1])).decode()
    request = {"input_data": {"columns": ["image_path", "decode"], "data": [[encoded, decode]]}}
    response = client.post("/score", json=request)
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
        routes = [("get", "/v1/images/1"), ("get", "/v1/studies/1"), ("get", "/v1/images/1/preview.png"),
                  ("get", "/v1/images/1/latent.npy"), ("get", "/v1/spaces"), ("get", "/readyz"),
                  ("post", "/v1/search"), ("post", "/score")]
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = getattr(client, method)(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "unauthorized"
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/images/1", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_body_cap_gives_413(archive: tuple[Path, list[Path]]) -> None:
    for client in _client(archive[0], max_request_bytes=2048):
        response = client.post("/v1/search", files={"file": ("big.png", b"x" * 5000, "image/png")})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
