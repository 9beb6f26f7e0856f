"""`retrieval backup` / `retrieval restore` through the CLI: a restored archive answers identically."""

from __future__ import annotations

import json
from pathlib import Path

from cli_runner import run_cli
from conftest import db_counts, make_archive, uuid_suffix


def _searches(env: dict[str, str], queries: list[Path]) -> list[list[tuple[int, float]]]:
    results = []
    for query in queries:
        found = json.loads(run_cli(env, "search", str(query), "-k", "8", "--group-by", "image", "--json").stdout)
        results.append([(r["images"][0]["image_id"], r["images"][0]["score"]) for r in found["results"]])
    return results


def test_backup_restore_gives_identical_results(cli_env: dict[str, str], tmp_path: Path, request) -> None:  # type: ignore[no-untyped-def]
    files = make_archive(tmp_path / "archive", studies=4, per_study=2)
    run_cli(cli_env, "ingest", str(tmp_path / "archive"), "--no-progress")
    before = _searches(cli_env, files[2:3])  # the whole archive ranked: ids and scores
    out = run_cli(cli_env, "backup", str(tmp_path / "backup")).stdout
    assert "backed up 8 images" in out
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 8 and any(name.endswith(".faiss") for name in manifest["files"])

    # a fresh data dir (and, on PostgreSQL, a fresh database)
    target = dict(cli_env, RETRIEVAL_DATA_DIR=str(tmp_path / "restored"))
    if "RETRIEVAL_DATABASE_URL" in cli_env:
        from sqlalchemy import create_engine, text

        base = cli_env["RETRIEVAL_DATABASE_URL"].rsplit("/", 1)[0]
        name = f"restored_{uuid_suffix()}"
        admin = create_engine(base + "/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        target["RETRIEVAL_DATABASE_URL"] = f"{base}/{name}"

        def drop() -> None:
            with admin.connect() as conn:
                conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            admin.dispose()

        request.addfinalizer(drop)
    restored = run_cli(target, "restore", str(tmp_path / "backup"))
    assert "restored 8 images" in restored.stdout
    counts = db_counts(target)
    assert counts["images"] == counts["vectors"] == counts["latents"] == 8
    assert _searches(target, files[2:3]) == before

    # restoring over a database that holds images is refused; an altered backup is refused
    again = run_cli(target, "restore", str(tmp_path / "backup"), check=False)
    assert again.returncode == 2 and "already holds 8 images" in again.stderr
    index_file = next((tmp_path / "backup" / "index").glob("*.faiss"))
    index_file.write_bytes(index_file.read_bytes()[:-10])
    tampered = run_cli(target, "restore", str(tmp_path / "backup"), "--force", check=False)
    assert tampered.returncode == 2 and "altered since the backup" in tampered.stderr
