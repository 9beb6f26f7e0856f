"""The bad-input corpus through the CLI (every good file in, every bad one recorded) and the API (4xx, never 5xx)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bad_inputs import build_corpus, manifest_cases
from cli_runner import run_cli
from conftest import database_url, tiny_settings
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from api.main import create_app
from retrieval.domain.items import printable_path
from retrieval.service import SpaceService


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus") / "archive"
    return root, build_corpus(root)


def test_corpus_is_big_enough(corpus: tuple[Path, dict[str, str]]) -> None:
    _, expected = corpus
    assert len(expected) >= 40
    assert sum(outcome == "fail" for outcome in expected.values()) >= 20


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # the bad-file handling is backend-independent; PG is covered by the SIGKILL and jobs tests
def test_cli_ingests_every_good_file_and_records_every_bad_one(corpus: tuple[Path, dict[str, str]], cli_env: dict[str, str]) -> None:
    root, expected = corpus
    result = run_cli(cli_env, "ingest", str(root), "--json", "--no-progress")
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    failures = {os.path.relpath(f["source"], root): f for f in report["failures"]}
    should_fail = {p for p, outcome in expected.items() if outcome == "fail"}
    assert set(failures) == should_fail, (set(failures) ^ should_fail)
    assert all(f["reason"].strip() and f["stage"] in {"read", "decode"} for f in failures.values())
    assert report["ingested"] == sum(outcome == "ok" for outcome in expected.values())
    engine = create_engine(database_url(cli_env))
    with engine.connect() as conn:
        stored = {row[0] for row in conn.execute(text("SELECT source_uri FROM images"))}
        recorded = conn.execute(text("SELECT count(*) FROM ingest_errors")).scalar_one()
    engine.dispose()
    assert recorded == len(should_fail)
    assert len(stored) == report["ingested"]

    refused, mixed = manifest_cases(root, expected)
    no_path = run_cli(cli_env, "ingest", refused[0], check=False)
    assert no_path.returncode == 2 and "needs a `path` column" in no_path.stderr
    rows = json.loads(run_cli(cli_env, "ingest", mixed[0], "--json", "--no-progress").stdout)
    assert rows["skipped"] == 1 and rows["ingested"] == 0 and rows["failed"] == 4
    reasons = " | ".join(f"{f['source']}: {f['reason']}" for f in rows["failures"])
    assert "empty `path`" in reasons and "exist.png" in reasons and "zero.png" in reasons and "short-row" in reasons


def test_api_answers_every_bad_upload_with_a_4xx(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, expected = corpus
    settings = tiny_settings(tmp_path / "data", max_image_pixels=50_000_000)
    with TestClient(create_app(settings, service=SpaceService(settings)), raise_server_exceptions=False) as client:
        for relative, outcome in expected.items():
            data = (root / relative).read_bytes()
            name = printable_path(Path(relative).name)  # what a client can send of a non-UTF-8 name
            response = client.post("/v1/search", files={"file": (name, data, "application/octet-stream")})
            if outcome == "ok":
                assert response.status_code == 200, (relative, response.text)
            else:
                assert 400 <= response.status_code < 500, (relative, response.status_code, response.text)
                message = response.json()["error"]["message"]
                assert message and name in message, (relative, message)


def test_fuzzer_findings_stay_fixed() -> None:
    """Inputs that once escaped the decode contract (found by bench/fuzz_decode.py) now fail cleanly."""
    from retrieval.errors import ImageDecodeError
    from retrieval.imaging.decode import decode_bytes

    findings = sorted((Path(__file__).parent / "fixtures" / "fuzz").glob("*.bin"))
    assert findings
    for finding in findings:
        with pytest.raises(ImageDecodeError):
            decode_bytes(finding.read_bytes(), name=finding.name, max_pixels=4_000_000)
