"""The CLI as a user runs it, on SQLite and PostgreSQL: in this process, and as real processes where that matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli, run_cli_process
from conftest import database_url, db_counts, make_archive, synthetic_image, write_png
from dicom_factory import write_dicom
from PIL import Image
from sqlalchemy import create_engine, text

from retrieval.config import DEFAULT_ID_SECRET


def index_count(env: dict[str, str]) -> int:
    sidecars = list((Path(env["RETRIEVAL_DATA_DIR"]) / "index").glob("*.json"))
    assert len(sidecars) == 1
    return json.loads(sidecars[0].read_text())["count"]


def test_ingest_search_reingest(cli_env: dict[str, str], tmp_path: Path) -> None:
    """The one end-to-end run on real MedVAE (seeded random weights) per backend; the others use the fake encoder."""
    cli_env = {**cli_env, "RETRIEVAL_WEIGHTS": "random"}
    archive = tmp_path / "archive"
    files = make_archive(archive, studies=4, per_study=3)
    write_dicom(archive / "dicom_study" / "a.dcm", (synthetic_image(77) * 4000).astype(np.uint16), window=(2000, 4000),
                PatientID="PAT-SECRET-1", PatientName="Doe^Jane", BodyPartExamined="CHEST", ViewPosition="PA")
    result = run_cli_process(cli_env, "ingest", str(archive), "--json", "--no-progress")  # `python -m retrieval` as typed
    report = json.loads(result.stdout)
    assert report["ingested"] == len(files) + 1 and report["failed"] == 0
    assert report["model"]["weights"] == "random-init"
    assert "RANDOM-INITIALISED" in result.stderr

    # a stored image finds its own study first, with score ~1
    query = files[4]  # study_1/img_1.png
    found = json.loads(run_cli(cli_env, "search", str(query), "-k", "3", "--json").stdout)
    assert found["model"]["weights"] == "random-init" and found["space"]["weights"] == "random-init"
    top = found["results"][0]
    assert top["study"]["label"] == "study_1" and top["score"] > 0.9999
    assert top["images"][0]["source"] == str(query.resolve())

    # a resized, brightness-shifted copy still finds its original in the top 3
    pixels = np.asarray(Image.open(files[7]).convert("L"), dtype=np.float32) / 255.0
    shifted = Image.fromarray((np.clip(pixels * 0.8 + 0.15, 0, 1) * 255).astype(np.uint8)).resize((70, 70))
    shifted.save(tmp_path / "query.png")
    found = json.loads(run_cli(cli_env, "search", str(tmp_path / "query.png"), "-k", "3", "--json").stdout)
    assert len(found["results"]) == 3
    top3_sources = [image["source"] for result in found["results"] for image in result["images"]]
    assert str(files[7].resolve()) in top3_sources

    # filters and group_by=image
    by_image = json.loads(run_cli(cli_env, "search", "--image-id", "1", "-k", "2", "--group-by", "image", "--json").stdout)
    assert len(by_image["results"]) == 2 and len(by_image["results"][0]["images"]) == 1
    chest = json.loads(run_cli(cli_env, "search", str(query), "--filter", "body_part=chest", "--json").stdout)
    assert [r["images"][0]["body_part"] for r in chest["results"]] == ["CHEST"]

    # re-ingest is a no-op
    again = run_cli(cli_env, "ingest", str(archive), "--no-progress")
    assert "ingested 0, skipped 13, failed 0" in again.stdout
    counts = db_counts(cli_env)
    assert counts["images"] == counts["vectors"] == counts["latents"] == counts["distinct_sha"] == 13
    assert index_count(cli_env) == 13

    # the patient identifiers never reach the database in clear
    engine = create_engine(database_url(cli_env))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM images")).fetchall() + conn.execute(text("SELECT * FROM studies")).fetchall()
    engine.dispose()
    dump = repr(rows)
    assert "PAT-SECRET-1" not in dump and "Doe" not in dump and "Jane" not in dump


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # reads stored rows and index files only; PG adds time, not coverage
def test_preview_export_reindex_doctor(cli_env: dict[str, str], tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    make_archive(archive, studies=2, per_study=2)
    run_cli(cli_env, "ingest", str(archive), "--no-progress")
    preview = tmp_path / "p.png"
    run_cli(cli_env, "preview", "1", str(preview))
    absent = run_cli(cli_env, "preview", "9999", str(tmp_path / "none.png"), check=False)
    assert absent.returncode == 2 and "image 9999 does not exist" in absent.stderr
    image = Image.open(preview)
    assert image.size == (64, 64) and "reconstruction" in image.info["Description"]
    run_cli(cli_env, "export", str(tmp_path / "export"))
    shard = np.load(tmp_path / "export" / "latents-00000.npz")
    assert shard["z"].shape == (4, 4, 8, 8) and shard["vectors"].shape == (4, 84)
    assert (tmp_path / "export" / "metadata.csv").read_text().count("\n") == 5
    out = run_cli(cli_env, "reindex", "--to-pooling", "grid:2").stdout
    assert "4 vectors derived from stored z" in out and "index holds 4" in out
    moved = dict(cli_env, RETRIEVAL_POOLING="grid:2")
    found = json.loads(run_cli(moved, "search", "--image-id", "2", "-k", "1", "--json").stdout)
    assert found["space"]["pooling"] == "grid:2" and found["space"]["dim"] == 16
    assert found["results"][0]["images"][0]["image_id"] == 2
    doctor = json.loads(run_cli(cli_env, "doctor", "--json").stdout)
    assert doctor["weights"]["not_medvae_weights"] is True and doctor["index"]["consistent"] is True
    assert doctor["database"]["counts"]["images"] == 4


@pytest.mark.usefixtures("no_semaphores_left_by_the_killed")
def test_sigkill_mid_ingest_then_rerun_stores_each_image_once(cli_env: dict[str, str], tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    files = make_archive(archive, studies=8, per_study=5)
    env = dict(cli_env, RETRIEVAL_BATCH_SIZE="1", RETRIEVAL_WEIGHTS="random")  # real MedVAE: slow enough to be killed mid-ingest
    process = subprocess.Popen(
        [sys.executable, "-m", "retrieval", "ingest", str(archive), "--no-progress"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    stored = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            stored = db_counts(env)["vectors"]
        except Exception:  # the schema may not exist yet
            stored = 0
        if stored >= 5:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 5 <= stored < len(files), "the kill must land mid-ingest"
    rerun = run_cli(env, "ingest", str(archive), "--no-progress")
    assert "failed 0" in rerun.stdout
    counts = db_counts(env)
    assert counts["images"] == counts["distinct_sha"] == counts["vectors"] == counts["latents"] == len(files)
    assert index_count(env) == len(files)


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # decode failures do not touch the backend
def test_bad_files_are_recorded_and_good_ones_ingested(cli_env: dict[str, str], tmp_path: Path) -> None:
    import struct
    import zlib

    archive = tmp_path / "archive"
    good = make_archive(archive, studies=2, per_study=2)
    bad = archive / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    write_png(bad / "trunc.png", synthetic_image(3))
    (bad / "trunc.png").write_bytes((bad / "trunc.png").read_bytes()[:300])
    dcm = write_dicom(bad / "trunc.dcm", (synthetic_image(4) * 1000).astype(np.uint16))
    dcm.write_bytes(dcm.read_bytes()[:-2000])
    (bad / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.new("L", (1, 1)).save(bad / "bomb.png")
    data = bytearray((bad / "bomb.png").read_bytes())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    (bad / "bomb.png").write_bytes(bytes(data))
    (archive / "notes.txt").write_text("ignored: not an image suffix")

    result = run_cli(cli_env, "ingest", str(archive), "--no-progress")
    assert f"ingested {len(good)}, skipped 0, failed 5" in result.stdout
    for name, reason in [("zero.png", "empty"), ("trunc.png", "truncated"), ("trunc.dcm", ""), ("noise.png", "not a recognised"),
                         ("bomb.png", "pixel cap")]:
        lines = [line for line in result.stdout.splitlines() if line.startswith("failed") and name in line]
        assert lines and reason in lines[0], (name, result.stdout)
    strict = run_cli(cli_env, "ingest", str(archive), "--no-progress", "--strict", check=False)
    assert strict.returncode == 1  # the five bad files fail again; nothing else changes
    assert db_counts(cli_env)["images"] == len(good)
    engine = create_engine(database_url(cli_env))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ingest_errors")).scalar_one() == 10
    engine.dispose()


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # argument and file errors come before any database work
def test_errors_are_clear(cli_env: dict[str, str], tmp_path: Path) -> None:
    missing = run_cli(cli_env, "ingest", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,study\na.png,s\n")
    bad_manifest = run_cli(cli_env, "ingest", str(manifest), check=False)
    assert bad_manifest.returncode == 2 and "needs a `path` column" in bad_manifest.stderr
    as_json = run_cli(cli_env, "search", str(tmp_path / "nope.png"), "--json", check=False)
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"]["code"] == "image_decode_error"

    # issue 16.7: database problems are one line and exit 2 (doctor: exit 1 and the problem named)
    shared = dict(cli_env, RETRIEVAL_ID_SECRET="a-secret-of-our-own")
    down = dict(shared, RETRIEVAL_DATABASE_URL="postgresql://root:hunter2@127.0.0.1:9/archive")
    for args in (["search", "--image-id", "1"], ["ingest", str(manifest)], ["db", "upgrade"], ["serve", "--port", "9"]):
        refused = run_cli(down, *args, check=False)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot open the database postgresql+psycopg://root:***@127.0.0.1:9" in errors[0]
        assert "hunter2" not in refused.stderr
    doctor = run_cli(down, "doctor", "--no-model", check=False)
    assert doctor.returncode == 1 and "problem: database: cannot open the database" in doctor.stderr
    garbage = run_cli(dict(shared, RETRIEVAL_DATABASE_URL="not a url"), "doctor", check=False)
    assert garbage.returncode == 2 and "RETRIEVAL_DATABASE_URL (storage.database_url): not a database URL" in garbage.stderr
    placeholder = run_cli(dict(cli_env, RETRIEVAL_ID_SECRET=DEFAULT_ID_SECRET), "doctor", "--no-model")
    assert placeholder.returncode == 0 and "RETRIEVAL_ID_SECRET is the built-in placeholder" in placeholder.stderr


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # messages only
def test_ingest_says_why_it_found_or_skipped_nothing(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Issue 16.9: an empty folder, skips with their reasons, an empty archive naming the data dir in use."""
    from pydicom.data import get_testdata_file

    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "notes" / "readme.txt").write_text("no images here")
    empty = run_cli(cli_env, "ingest", str(tmp_path / "empty"), "--no-progress")
    assert f"no images found under {tmp_path / 'empty'}" in empty.stdout
    searched = run_cli(cli_env, "search", str(make_archive(tmp_path / "q", studies=1, per_study=1)[0]), check=False)
    assert f"the archive in the data dir {Path(cli_env['RETRIEVAL_DATA_DIR']).resolve()} is empty" in searched.stderr
    mr = tmp_path / "mr"
    mr.mkdir()
    for name in ("MR_small.dcm", "MR_small_RLE.dcm"):  # one SOP instance, two encodings
        (mr / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    (mr / "copy.dcm").write_bytes((mr / "MR_small.dcm").read_bytes())
    first = run_cli(cli_env, "ingest", str(mr), "--no-progress", "--json")
    reasons = json.loads(first.stdout)["skip_reasons"]
    assert json.loads(first.stdout)["ingested"] == 1 and reasons == {
        "same bytes as another file of this run": 1,
        "same SOPInstanceUID as another file (a copy of one DICOM instance)": 1,
    }
    again = run_cli(cli_env, "ingest", str(mr), "--no-progress")
    assert "ingested 0, skipped 3, failed 0; skipped: 3 already stored in this space" in again.stdout


@pytest.mark.parametrize("cli_env", ["sqlite"], indirect=True)  # the weights come before any database work
def test_offline_first_run_says_so_once(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Issue 16.8: no hub and no cached weights: one sentence at once, not half a minute of retry warnings."""
    env = dict(cli_env, RETRIEVAL_WEIGHTS="hub", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hf"))
    make_archive(tmp_path / "archive", studies=1, per_study=1)
    refused = run_cli(env, "ingest", str(tmp_path / "archive"), "--no-progress", check=False)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the Hugging Face hub (127.0.0.1:9) cannot be reached" in lines[0], refused.stderr
    doctor = run_cli(env, "doctor", "--no-model")  # issue 13.6: `main` moves; a commit sha pins the weights
    assert "RETRIEVAL_HUB_REVISION=main is a branch, not a commit" in doctor.stderr
    pinned = run_cli(dict(env, RETRIEVAL_HUB_REVISION="0123456789abcdef0123456789abcdef01234567"), "doctor", "--no-model")
    assert "is a branch" not in pinned.stderr
