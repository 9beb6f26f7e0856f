"""``retrieval backup DIR`` / ``retrieval restore DIR``: the database plus the index files.

Layout of a backup folder:

* ``database.sqlite`` (SQLite, written with SQLite's online backup API, so a running server or
  ingest keeps going and the copy is a consistent snapshot) or ``database.pgdump`` (PostgreSQL,
  ``pg_dump --format=custom``; ``pg_dump`` / ``pg_restore`` must be on PATH);
* ``index/``: every space's ``.faiss`` + ``.json`` sidecar (+ the ``.ivfdata`` lists file the sidecar names, for an
  IVF-PQ space), copied under the index's shared lock;
* ``manifest.json``: when, from which database kind and migration revision, row counts, and the
  sha256 of every file.

The index is derived data: a restore copies it back when present, and the index's own open-time
check catches up or rebuilds it from the restored database if it is older than the snapshot.
Restore refuses a target database that already holds images unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from retrieval.config import Settings
from retrieval.errors import ConfigurationError, InvalidRequestError
from retrieval.storage.database import current_revision
from retrieval.storage.index import Sidecar, file_lock
from retrieval.storage.store import Store

MANIFEST = "manifest.json"
SQLITE_FILE = "database.sqlite"
PG_FILE = "database.pgdump"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sqlite_path(url: str) -> Path:
    return Path(make_url(url).database or "")


def _pg_dsn(url: str) -> str:
    """A libpq URL for pg_dump / pg_restore (SQLAlchemy's driver suffix removed)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _run(command: list[str], what: str) -> None:
    if shutil.which(command[0]) is None:
        raise ConfigurationError(f"{command[0]} is not on PATH: install the PostgreSQL client tools to {what}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigurationError(f"{command[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def backup(settings: Settings, target: Path) -> dict[str, Any]:
    """Write a backup of the configured archive into the empty or new folder ``target``."""
    if target.exists() and any(target.iterdir()):
        raise InvalidRequestError(f"{target}: backup folder must be new or empty", detail={"field": "target"})
    target.mkdir(parents=True, exist_ok=True)
    url = settings.storage.resolved_database_url
    store = Store.open(settings)
    try:
        counts = store.counts()
        revision = current_revision(store.engine)
    finally:
        store.close()
    if url.startswith("sqlite"):
        source = sqlite3.connect(_sqlite_path(url))
        destination = sqlite3.connect(target / SQLITE_FILE)
        with destination:
            source.backup(destination)
        source.close()
        destination.close()
        kind = "sqlite"
    else:
        _run(["pg_dump", "--format=custom", "--no-owner", f"--file={target / PG_FILE}", _pg_dsn(url)], "back up")
        kind = "postgresql"
    _copy_index(settings.storage.index_dir, target / "index")
    files = {str(p.relative_to(target)): _sha256(p) for p in sorted(target.rglob("*")) if p.is_file()}
    manifest = {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "database": kind,
        "alembic_revision": revision,
        "counts": counts,
        "files": files,
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _copy_index(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        return
    for sidecar in sorted(source.glob("*.json")):
        faiss_file = sidecar.with_suffix(".faiss")
        lock = sidecar.with_suffix(".lock")
        with file_lock(lock, exclusive=False):  # never a half-written pair
            if faiss_file.exists():
                shutil.copy2(faiss_file, target / faiss_file.name)
                shutil.copy2(sidecar, target / sidecar.name)
                copied = Sidecar.read(target / sidecar.name)
                if copied is not None and copied.data_file and (source / copied.data_file).exists():
                    shutil.copy2(source / copied.data_file, target / copied.data_file)  # IVF-PQ's mapped lists


def restore(settings: Settings, source: Path, *, force: bool = False) -> dict[str, Any]:
    """Restore a backup folder into the configured database and data dir; returns its manifest."""
    manifest_path = source / MANIFEST
    if not manifest_path.is_file():
        raise InvalidRequestError(f"{source}: not a backup folder (no {MANIFEST})", detail={"field": "source"})
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        if not (source / name).is_file() or _sha256(source / name) != digest:
            raise InvalidRequestError(f"{source / name}: missing or altered since the backup", detail={"file": name})
    url = settings.storage.resolved_database_url
    kind = "sqlite" if url.startswith("sqlite") else "postgresql"
    if kind != manifest["database"]:
        raise InvalidRequestError(
            f"backup holds a {manifest['database']} database; the configured one is {kind}",
            detail={"backup": manifest["database"], "configured": kind},
        )
    store = Store.open(settings)
    try:
        images = store.counts()["images"]
    finally:
        store.close()
    if images and not force:
        raise InvalidRequestError(
            f"the configured database already holds {images} images; restore into an empty one or pass --force",
            detail={"images": images},
        )
    if kind == "sqlite":
        backup_db = sqlite3.connect(source / SQLITE_FILE)
        live = sqlite3.connect(_sqlite_path(url))
        with live:
            backup_db.backup(live)
        backup_db.close()
        live.close()
    else:
        _run(["pg_restore", "--clean", "--if-exists", "--no-owner", f"--dbname={_pg_dsn(url)}", str(source / PG_FILE)],
             "restore")
    index_dir = settings.storage.index_dir
    index_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*index_dir.glob("*.faiss"), *index_dir.glob("*.json"), *index_dir.glob("*.ivfdata")]:
        stale.unlink()
    for item in sorted((source / "index").glob("*")):
        shutil.copy2(item, index_dir / item.name)
    return manifest
