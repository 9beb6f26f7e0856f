"""No direct identifier of a real DICOM file reaches the database or the data dir; PG needs an own secret."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_runner import run_cli
from conftest import database_url
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, text

from retrieval.config import Settings
from retrieval.domain.metadata import keyed_hash

# identifying values in pydicom's CT_small.dcm (PatientName, PatientID, InstitutionName, StationName)
IDENTIFIERS = ["CompressedSamples", "CT1^", "1CT1", "JFK IMAGING CENTER", "CT01_OC0"]


def _database_dump(env: dict[str, str]) -> str:
    url = database_url(env)
    if url.startswith("sqlite"):
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        dump = "\n".join(connection.iterdump())
        connection.close()
        return dump
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    return subprocess.run(["pg_dump", "--data-only", libpq], capture_output=True, text=True, check=True).stdout


def test_ct_small_identifiers_are_never_stored(cli_env: dict[str, str], tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    run_cli(cli_env, "ingest", str(archive), "--no-progress")
    dump = _database_dump(cli_env)
    assert "INSERT INTO" in dump or "COPY " in dump  # a real dump of the stored rows
    for value in IDENTIFIERS:
        assert value not in dump, f"{value!r} found in the database dump"
    for path in Path(cli_env["RETRIEVAL_DATA_DIR"]).rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for value in IDENTIFIERS:
                assert value.encode() not in content, f"{value!r} found in {path}"
    expected = keyed_hash("1CT1", cli_env["RETRIEVAL_ID_SECRET"])
    engine = create_engine(database_url(cli_env))
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT patient_hash, modality FROM images")).one()
    engine.dispose()
    assert tuple(stored) == (expected, "CT")  # the hash is there (keyed), the identifier is not


def test_postgresql_refuses_the_placeholder_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RETRIEVAL_ID_SECRET is the built-in placeholder"):
        Settings(data_dir=tmp_path, database_url="postgresql+psycopg://root@127.0.0.1:5432/test")
    Settings(data_dir=tmp_path)  # the embedded SQLite default still starts (doctor warns)
    env = {"PATH": "/usr/bin:/bin", "RETRIEVAL_DATABASE_URL": "postgresql+psycopg://root@127.0.0.1:5432/test",
           "RETRIEVAL_DATA_DIR": str(tmp_path)}
    import os
    import sys

    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    refused = subprocess.run([sys.executable, "-m", "retrieval", "doctor"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "RETRIEVAL_ID_SECRET" in refused.stderr
    # issue 16.7: one plain line, not pydantic's "1 validation error ... errors.pydantic.dev" block
    assert "validation error" not in refused.stderr and "errors.pydantic.dev" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
