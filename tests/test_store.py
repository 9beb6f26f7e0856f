from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_settings
from sqlalchemy import inspect

from retrieval.domain.metadata import ImageMetadata, keyed_hash
from retrieval.domain.spaces import SpaceIdentity
from retrieval.storage.database import current_revision
from retrieval.storage.orm import Base
from retrieval.storage.rows import NewImage
from retrieval.storage.store import Store


def _image(n: int, **meta: object) -> NewImage:
    return NewImage(
        source_uri=f"/a/{n}.png", sha256=f"{n:064x}", study_key="folder:/a", study_label="a", kind="raster",
        width=10, height=10, frames=1, metadata=ImageMetadata(**meta),  # type: ignore[arg-type]
        z=np.full((4, 2, 2), n, np.float32), vector=np.eye(4, dtype=np.float32)[n % 4],
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = Store.open(tiny_settings(tmp_path / "data", url))
    if request.param == "postgres":  # the session database is shared: start each test empty


        with opened.engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    yield opened
    opened.close()


def test_migrations_create_schema_and_are_idempotent(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from retrieval.storage.database import alembic_config, upgrade_database

    upgrade_database(store.engine)
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert current_revision(store.engine) == head
    tables = set(inspect(store.engine).get_table_names())
    assert {"spaces", "studies", "images", "latents", "vectors", "ingest_errors", "ingest_jobs"} <= tables
    with store.engine.connect() as connection:  # the migrations build exactly what the models declare
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_write_batch_is_idempotent_and_keeps_latents(store: Store) -> None:
    space = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "mean", 4))
    assert store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "mean", 4)).id == space.id
    written = store.write_batch(space=space, images=[_image(1), _image(2)])
    assert [w.image_id for w in written] == sorted(w.image_id for w in written)
    assert store.write_batch(space=space, images=[_image(1)]) == []
    assert store.counts()["images"] == 2 and store.counts()["vectors"] == 2 and store.counts()["latents"] == 2
    z = store.latent(written[0].image_id, space.encoder_key)
    assert z is not None and z.shape == (4, 2, 2) and float(z[0, 0, 0]) == 1.0
    assert store.already_in_space(space.id, [f"{1:064x}", f"{9:064x}"], []) == {f"{1:064x}"}


def test_failed_batch_writes_nothing(store: Store) -> None:
    space = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "mean", 4))
    bad = _image(3)
    bad.vector = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="vector must be 4 finite values"):
        store.write_batch(space=space, images=[_image(4), bad])
    assert store.counts() == {"studies": 0, "images": 0, "latents": 0, "vectors": 0, "ingest_errors": 0}


def test_second_space_reuses_image_rows(store: Store) -> None:
    first = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "mean", 4))
    second = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "grid:1", 4))
    store.write_batch(space=first, images=[_image(5)])
    written = store.write_batch(space=second, images=[_image(5)])
    assert len(written) == 1
    counts = store.counts()
    assert counts["images"] == 1 and counts["vectors"] == 2 and counts["latents"] == 1  # same encoder key


def test_identifiers_stored_only_as_keyed_hashes(store: Store) -> None:
    space = store.ensure_space(SpaceIdentity("m", "w", 64, "v1", "mean", 4))
    digest = keyed_hash("PAT-123", "secret")
    store.write_batch(space=space, images=[_image(6, patient_hash=digest)])
    image = next(iter(store.images_by_id([1]).values()), None) or list(store.iter_images())[0][0]
    assert image.patient_hash == digest and "PAT-123" not in digest and len(digest) == 64
