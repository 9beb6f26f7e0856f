"""The store: the few queries and the one batch write the service needs (the database is the source of truth).

All writes of one ingest batch happen in one transaction (:meth:`Store.write_batch`): an image
row, its latent and its vector land together or not at all, so a crash never leaves an orphan
latent or vector and never duplicates an image (unique sha256 / SOPInstanceUID).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from retrieval.config import Settings
from retrieval.domain.metadata import ImageMetadata
from retrieval.domain.spaces import SpaceIdentity
from retrieval.storage.database import open_engine
from retrieval.storage.orm import (
    ImageRecord,
    IngestError,
    IngestJob,
    Latent,
    Space,
    Study,
    Vector,
)
from retrieval.storage.rows import (
    MANIFEST_FILLED,
    NewImage,
    check_arrays,
    chunks,
    decode_latent,
    image_row,
    serialize_vector_writes,
)

logger = logging.getLogger(__name__)


@dataclass
class StoredVector:
    row_id: int
    image_id: int
    vector: np.ndarray = field(repr=False)


class Store:
    """Thin façade over the session factory; every method opens and closes its own session."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool = True) -> Store:
        """Open the configured database (:func:`~retrieval.storage.database.open_engine`)."""
        return cls(open_engine(settings.storage.resolved_database_url, migrate=migrate))

    def close(self) -> None:
        self.engine.dispose()

    # -- spaces

    def ensure_space(self, identity: SpaceIdentity) -> Space:
        """The row of this space, created on first use."""
        with self.sessions.begin() as session:
            space = session.scalar(select(Space).where(Space.key == identity.key))
            if space is not None:
                return space
            space = Space(
                key=identity.key,
                encoder_key=identity.encoder_key,
                model=identity.model,
                weights=identity.weights,
                input_size=identity.input_size,
                preprocessing=identity.preprocessing,
                pooling=identity.pooling,
                dim=identity.dim,
            )
            session.add(space)
            try:
                session.flush()
            except IntegrityError:  # created concurrently by another process
                session.rollback()
                return session.scalars(select(Space).where(Space.key == identity.key)).one()
            return space

    def list_spaces(self) -> list[Space]:
        with self.sessions() as session:
            return list(session.scalars(select(Space).order_by(Space.id)))

    def get_space_by_id(self, space_id: int) -> Space:
        with self.sessions() as session:
            return session.get_one(Space, space_id)

    # -- skip checks

    def already_in_space(self, space_id: int, sha256s: Sequence[str], sop_uids: Sequence[str]) -> set[str]:
        """Of the given hashes / SOP UIDs, those whose image already has a vector in the space."""
        return self._values_in_space(space_id, ImageRecord.sha256, sha256s) | self._values_in_space(
            space_id, ImageRecord.sop_uid, sop_uids
        )

    def series_in_space(self, space_id: int, series_uids: Sequence[str]) -> set[str]:
        """Of the given SeriesInstanceUIDs, those with a vector in the space (3-D: one per series)."""
        return self._values_in_space(space_id, ImageRecord.series_uid, series_uids)

    def _values_in_space(self, space_id: int, column: Any, values: Sequence[str]) -> set[str]:
        """Of ``values``, those that ``column`` (of an image row) holds for an image with a vector in the space."""
        found: set[str] = set()
        with self.sessions() as session:
            for chunk in chunks([value for value in values if value], 500):
                rows = session.execute(
                    select(column)
                    .join(Vector, Vector.image_id == ImageRecord.id)
                    .where(Vector.space_id == space_id, column.in_(chunk))
                )
                found.update(row[0] for row in rows)
        return found

    # -- writes

    def write_batch(
        self, *, space: Space, images: Sequence[NewImage], job_id: str | None = None,
        also: Sequence[tuple[Space, np.ndarray]] = (),
    ) -> list[StoredVector]:
        """Store a batch in ONE transaction; returns the vectors written to ``space`` (for the index).

        An image already present (same sha256 or SOPInstanceUID) is reused: only its missing
        latent / vector are added. Nothing is written when any row fails. With ``job_id``, the
        job's ``ingested`` count grows in the same transaction, so it stays exact across crashes.
        ``also``: other spaces of the same encoder and their ``(len(images), D)`` vectors (heads fanned
        out from one encode), written in the same transaction where the image has none there yet.
        """
        for new in images:
            check_arrays(new, space.dim)
        for other, vectors in also:
            if vectors.shape != (len(images), other.dim) or not np.all(np.isfinite(vectors)):
                raise ValueError(f"space {other.key[:12]}: vectors must be {len(images)} x {other.dim} finite values")
        written: list[StoredVector] = []
        with self.sessions.begin() as session:
            # every space written, in id order: two writers fanning out to the same spaces never deadlock
            for space_id in sorted({space.id, *(other.id for other, _ in also)}):
                serialize_vector_writes(session, space_id)
            for position, new in enumerate(images):
                image = self._find_image(session, new)
                if image is None:
                    study = self._get_or_create_study(session, new)
                    image = image_row(new, study.id)
                    session.add(image)
                    session.flush()
                elif new.quality is not None and image.recon_psnr is None:
                    image.recon_psnr, image.recon_ssim = new.quality
                has_latent = session.scalar(
                    select(Latent.id).where(Latent.image_id == image.id, Latent.encoder_key == space.encoder_key)
                )
                if has_latent is None:
                    z16 = np.ascontiguousarray(new.z, dtype=np.float16)
                    session.add(
                        Latent(
                            image_id=image.id,
                            encoder_key=space.encoder_key,
                            shape=",".join(str(d) for d in z16.shape),
                            dtype="float16",
                            data=z16.tobytes(),
                            spacing=list(new.spacing) if new.spacing is not None else None,
                            head=(np.ascontiguousarray(new.head, dtype=np.float16).tobytes()
                                  if new.head is not None else None),
                        )
                    )
                for other, vectors in also:
                    self._add_missing_vector(session, other, image.id, vectors[position])
                stored = self._add_missing_vector(session, space, image.id, new.vector)
                if stored is not None:
                    written.append(stored)
            if job_id is not None and written:
                session.execute(
                    update(IngestJob)
                    .where(IngestJob.id == job_id)
                    .values(ingested=IngestJob.ingested + len(written))
                    .execution_options(synchronize_session=False)
                )
        return written

    def add_vectors(self, *, space: Space, vectors: Sequence[tuple[int, np.ndarray]]) -> list[StoredVector]:
        """Add vectors for already stored images (re-pooling from stored z) in one transaction."""
        written: list[StoredVector] = []
        with self.sessions.begin() as session:
            serialize_vector_writes(session, space.id)
            for image_id, vector in vectors:
                stored = self._add_missing_vector(session, space, image_id, vector)
                if stored is not None:
                    written.append(stored)
        return written

    @staticmethod
    def _add_missing_vector(session: Session, space: Space, image_id: int, vector: np.ndarray) -> StoredVector | None:
        """Add the image's vector to ``space`` unless it has one there; the vector written, or None."""
        if session.scalar(select(Vector.id).where(Vector.image_id == image_id, Vector.space_id == space.id)) is not None:
            return None
        data = np.ascontiguousarray(vector, dtype=np.float32)
        row = Vector(image_id=image_id, space_id=space.id, data=data.tobytes())
        session.add(row)
        session.flush()
        return StoredVector(row_id=row.id, image_id=image_id, vector=data)

    @staticmethod
    def _find_image(session: Session, new: NewImage) -> ImageRecord | None:
        image = session.scalar(select(ImageRecord).where(ImageRecord.sha256 == new.sha256))
        if image is None and new.metadata.sop_uid:
            image = session.scalar(select(ImageRecord).where(ImageRecord.sop_uid == new.metadata.sop_uid))
        return image

    @staticmethod
    def _get_or_create_study(session: Session, new: NewImage) -> Study:
        study = session.scalar(select(Study).where(Study.study_key == new.study_key))
        if study is not None:
            return study
        study = Study(
            study_key=new.study_key,
            study_uid=new.metadata.study_uid,
            label=new.study_label,
            patient_hash=new.metadata.patient_hash,
            study_date=new.metadata.study_date,
        )
        try:
            with session.begin_nested():
                session.add(study)
        except IntegrityError:  # another writer created it in the meantime
            study = session.scalars(select(Study).where(Study.study_key == new.study_key)).one()
        return study

    def record_errors(self, *, run_id: str, failures: Iterable[tuple[str, str, str]]) -> None:
        """Store ``(source, stage, reason)`` failures of one run."""
        rows = [IngestError(run_id=run_id, source=s, stage=st, reason=r[:4000]) for s, st, r in failures]
        if not rows:
            return
        with self.sessions.begin() as session:
            session.add_all(rows)

    # -- reads

    def vectors_after(self, space_id: int, after_row_id: int = 0, chunk: int = 10_000) -> Iterator[list[StoredVector]]:
        """Stream a space's vectors with row id above ``after_row_id``, ordered, in chunks."""
        last = after_row_id
        while True:
            with self.sessions() as session:
                rows = session.execute(
                    select(Vector.id, Vector.image_id, Vector.data)
                    .where(Vector.space_id == space_id, Vector.id > last)
                    .order_by(Vector.id)
                    .limit(chunk)
                ).all()
            if not rows:
                return
            yield [StoredVector(r[0], r[1], np.frombuffer(r[2], dtype=np.float32)) for r in rows]
            last = rows[-1][0]

    def vector_stats(self, space_id: int) -> tuple[int, int]:
        """``(count, highest row id)`` of a space's vectors."""
        with self.sessions() as session:
            count, top = session.execute(
                select(func.count(Vector.id), func.max(Vector.id)).where(Vector.space_id == space_id)
            ).one()
        return int(count or 0), int(top or 0)

    def latents(self, encoder_key: str, chunk: int = 256) -> Iterator[list[tuple[int, np.ndarray]]]:
        """Stream ``(image_id, z float32)`` of every image encoded with ``encoder_key``."""
        last = 0
        while True:
            with self.sessions() as session:
                rows = session.execute(
                    select(Latent.id, Latent.image_id, Latent.shape, Latent.data)
                    .where(Latent.encoder_key == encoder_key, Latent.id > last)
                    .order_by(Latent.id)
                    .limit(chunk)
                ).all()
            if not rows:
                return
            yield [(r[1], decode_latent(r[2], r[3])) for r in rows]
            last = rows[-1][0]

    def latents_of(self, image_ids: Sequence[int], encoder_key: str) -> dict[int, np.ndarray]:
        """Stored z of ``image_ids`` under ``encoder_key``, in one query; ids without one are absent."""
        return self._latent_arrays(image_ids, encoder_key, Latent.data)

    def heads_of(self, image_ids: Sequence[int], encoder_key: str) -> dict[int, np.ndarray]:
        """Stored stage-2 latents (float32) of ``image_ids`` under ``encoder_key``; ids without one are absent."""
        return self._latent_arrays(image_ids, encoder_key, Latent.head)

    def _latent_arrays(self, image_ids: Sequence[int], encoder_key: str, column: Any) -> dict[int, np.ndarray]:
        """One float16 array column of ``latents`` (z's shape) for ``image_ids``, decoded; NULLs are absent."""
        with self.sessions() as session:
            rows = session.execute(select(Latent.image_id, Latent.shape, column).where(
                Latent.encoder_key == encoder_key, Latent.image_id.in_(list(image_ids)), column.is_not(None)))
            return {int(row[0]): decode_latent(row[1], row[2]) for row in rows}

    def latent_spacings(self, image_ids: Sequence[int], encoder_key: str) -> dict[int, tuple[float, float, float]]:
        """Volumes: mm per model-input voxel of the stored z of ``image_ids`` (images and older rows are absent)."""
        with self.sessions() as session:
            rows = session.execute(select(Latent.image_id, Latent.spacing).where(
                Latent.encoder_key == encoder_key, Latent.image_id.in_(list(image_ids)), Latent.spacing.is_not(None)))
            return {int(row[0]): (float(row[1][0]), float(row[1][1]), float(row[1][2])) for row in rows if row[1]}

    def latent(self, image_id: int, encoder_key: str) -> np.ndarray | None:
        return self.latents_of([image_id], encoder_key).get(image_id)

    def images_by_id(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Image rows (with their study loaded) for the given ids."""
        out: dict[int, ImageRecord] = {}
        with self.sessions() as session:
            for chunk in chunks(list(ids), 500):
                rows = session.scalars(
                    select(ImageRecord).options(selectinload(ImageRecord.study)).where(ImageRecord.id.in_(chunk))
                )
                out.update({row.id: row for row in rows})
        return out

    def study_with_images(self, study_id: int) -> Study | None:
        """A study with its images loaded (usable after the session closes), or ``None``."""
        with self.sessions() as session:
            return session.scalar(select(Study).options(selectinload(Study.images)).where(Study.id == study_id))

    def ping(self) -> None:
        """Raise when the database does not answer a trivial query (readiness)."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def images_by_sha256(self, sha256s: Sequence[str]) -> list[ImageRecord]:
        """Stored images with these content hashes."""
        out: list[ImageRecord] = []
        with self.sessions() as session:
            for chunk in chunks(list(sha256s), 500):
                out.extend(session.scalars(select(ImageRecord).where(ImageRecord.sha256.in_(chunk))))
        return out

    def apply_manifest_metadata(self, rows: Sequence[tuple[str, ImageMetadata]]) -> int:
        """Give stored images (by sha256) what a manifest row says, without re-encoding, as ingest would:
        empty fields filled (a DICOM header's values stay), ``labels`` replaced, kept extra columns added.
        One transaction; returns how many images changed."""
        changed = 0
        with self.sessions.begin() as session:
            images = {image.sha256: image for image in session.scalars(
                select(ImageRecord).where(ImageRecord.sha256.in_([sha256 for sha256, _ in rows])))}
            for sha256, meta in rows:
                image = images.get(sha256)
                if image is None:
                    continue
                updates = {name: getattr(meta, name) for name in MANIFEST_FILLED
                           if getattr(meta, name) is not None and getattr(image, name) is None}
                if meta.labels and sorted(image.labels or []) != meta.labels:
                    updates["labels"] = list(meta.labels)
                if meta.extra and {**(image.extra or {}), **meta.extra} != (image.extra or {}):
                    updates["extra"] = {**(image.extra or {}), **meta.extra}
                for name, value in updates.items():
                    setattr(image, name, value)
                changed += bool(updates)
        return changed

    def vectors_of(self, space_id: int, image_ids: Sequence[int]) -> np.ndarray:
        """The space's vectors of ``image_ids``, in that order, as a ``(N, D)`` float32 matrix."""
        found: dict[int, np.ndarray] = {}
        with self.sessions() as session:
            for chunk in chunks(list(image_ids), 500):
                rows = session.execute(
                    select(Vector.image_id, Vector.data).where(Vector.space_id == space_id, Vector.image_id.in_(chunk))
                )
                found.update({row[0]: np.frombuffer(row[1], dtype=np.float32) for row in rows})
        missing = [image_id for image_id in image_ids if image_id not in found]
        if missing:
            raise KeyError(f"images without a vector in space {space_id}: {missing[:10]}")
        return np.stack([found[image_id] for image_id in image_ids])

    def iter_images(self, chunk: int = 1000) -> Iterator[list[ImageRecord]]:
        last = 0
        while True:
            with self.sessions() as session:
                rows = list(
                    session.scalars(
                        select(ImageRecord)
                        .options(selectinload(ImageRecord.study))
                        .where(ImageRecord.id > last)
                        .order_by(ImageRecord.id)
                        .limit(chunk)
                    )
                )
            if not rows:
                return
            yield rows
            last = rows[-1].id

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            return {
                "studies": int(session.scalar(select(func.count(Study.id))) or 0),
                "images": int(session.scalar(select(func.count(ImageRecord.id))) or 0),
                "latents": int(session.scalar(select(func.count(Latent.id))) or 0),
                "vectors": int(session.scalar(select(func.count(Vector.id))) or 0),
                "ingest_errors": int(session.scalar(select(func.count(IngestError.id))) or 0),
            }

    def errors_of_run(self, run_id: str) -> list[IngestError]:
        with self.sessions() as session:
            return list(session.scalars(select(IngestError).where(IngestError.run_id == run_id).order_by(IngestError.id)))
