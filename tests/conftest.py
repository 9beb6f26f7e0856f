"""Shared fixtures: tiny settings with the fake encoder (or seeded random MedVAE weights where the
model matters), a PostgreSQL database per session."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from live_server import tiny_env
from PIL import Image
from sqlalchemy import create_engine, text

from retrieval.config import Settings

PG_ADMIN_URL = os.environ.get("RETRIEVAL_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


def tiny_settings(data_dir: Path, database_url: str | None = None, **overrides: object) -> Settings:
    """64-px settings on the fast deterministic fake encoder; pass ``weights="random"`` where MedVAE itself matters."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "weights": "fake",
        "seed": 0,
        "input_size": 64,
        "precision": "fp32",
        "decode_workers": 0,
        "batch_size": 4,
        "id_secret": "test-secret-not-for-production",
        "runtime": "torch",  # the OpenVINO runtime has its own tests (test_encoder.py)
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session", autouse=True)
def one_inductor_cache() -> None:
    """Inductor's usual cache (under /tmp) for every test and child process, so its instruction-set probes compile
    once per machine, not beside each test's compile cache, the default that test_compile_cache.py tests (decision 34)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())


@pytest.fixture
def no_semaphores_left_by_the_killed() -> Iterator[None]:
    """For tests that SIGKILL process groups: the killed take their multiprocessing resource tracker with them, so the
    named semaphores of their decode pools (``/dev/shm/sem.mp-*``) are never unlinked; those made during the test
    go with it. Only for tests whose every process is gone at the end (a live server's pool would need its names)."""
    shared_memory = Path("/dev/shm")
    before = set(shared_memory.glob("sem.mp-*"))
    yield
    for leaked in set(shared_memory.glob("sem.mp-*")) - before:
        leaked.unlink(missing_ok=True)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tiny_settings(tmp_path / "data")


@pytest.fixture(scope="session")
def encoder():  # type: ignore[no-untyped-def]
    from retrieval.model.encoder import MedVAEEncoder

    return MedVAEEncoder(tiny_settings(Path("/nonexistent-unused"), weights="random"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server, dropped afterwards. Fails loudly if unreachable."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"medvae_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, reported as a failure
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({exc}); start it or set RETRIEVAL_TEST_POSTGRES_URL")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def synthetic_image(seed: int, size: int = 96) -> np.ndarray:
    """A structured float [0, 1] test image: a few seeded blobs and stripes (distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size), np.float32)
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.25)
        image += rng.uniform(0.3, 1.0) * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / r**2))
    image += 0.3 * (np.sin(xx * rng.uniform(5, 30)) > 0)
    return image / image.max()


def write_png(path: Path, pixels: np.ndarray, *, bits: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        Image.fromarray((pixels * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    return path


def make_archive(root: Path, *, studies: int = 4, per_study: int = 3) -> list[Path]:
    """Folders of distinct synthetic studies (8- and 16-bit PNG); returns the files written."""
    files = []
    for s in range(studies):
        for i in range(per_study):
            base = synthetic_image(1000 * s)
            variant = np.clip(base + 0.03 * synthetic_image(1000 * s + i + 1), 0, 1)
            files.append(write_png(root / f"study_{s}" / f"img_{i}.png", variant, bits=16 if i % 2 else 8))
    return files


@pytest.fixture(params=["sqlite", "postgres"])
def cli_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for `python -m retrieval` processes: tiny fake-encoder settings, SQLite or PostgreSQL."""
    env = tiny_env(tmp_path / "data", RETRIEVAL_DECODE_WORKERS="1")  # one real decode worker process
    if request.param == "postgres":
        base = request.getfixturevalue("postgres_url")
        name = f"{base.rsplit('/', 1)[1]}_{uuid_suffix()}"
        admin = create_engine(base.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        env["RETRIEVAL_DATABASE_URL"] = base.rsplit("/", 1)[0] + f"/{name}"
        yield env
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
    else:
        yield env


def uuid_suffix() -> str:
    return uuid.uuid4().hex[:6]


def database_url(env: dict[str, str]) -> str:
    return env.get("RETRIEVAL_DATABASE_URL") or f"sqlite:///{Path(env['RETRIEVAL_DATA_DIR']) / 'retrieval.db'}"


def db_counts(env: dict[str, str]) -> dict[str, int]:
    engine = create_engine(database_url(env))
    with engine.connect() as conn:
        counts = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("images", "latents", "vectors", "studies")
        }
        counts["distinct_sha"] = conn.execute(text("SELECT count(DISTINCT sha256) FROM images")).scalar_one()
    engine.dispose()
    return counts


def assert_archive_intact(env: dict[str, str], expected_images: int) -> None:
    """Each image once, with one latent and one vector, no orphans, and the index on disk equal to the database."""
    counts = db_counts(env)
    assert counts["images"] == counts["distinct_sha"] == expected_images
    assert counts["latents"] == counts["vectors"] == expected_images
    engine = create_engine(database_url(env))
    with engine.connect() as conn:
        orphans = conn.execute(text(
            "SELECT count(*) FROM latents l LEFT JOIN images i ON i.id = l.image_id WHERE i.id IS NULL"
        )).scalar_one() + conn.execute(text(
            "SELECT count(*) FROM vectors v LEFT JOIN images i ON i.id = v.image_id WHERE i.id IS NULL"
        )).scalar_one()
        image_ids = {row[0] for row in conn.execute(text("SELECT image_id FROM vectors"))}
    engine.dispose()
    assert orphans == 0
    # the index on disk equals the database (what `doctor` calls consistent)
    index_dir = Path(env["RETRIEVAL_DATA_DIR"]) / "index"
    sidecar = json.loads(next(index_dir.glob("*.json")).read_text())
    index = faiss.read_index(str(next(index_dir.glob("*.faiss"))))
    assert index.ntotal == sidecar["count"] == expected_images
    assert set(faiss.vector_to_array(index.id_map).tolist()) == image_ids
