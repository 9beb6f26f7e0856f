"""SQLAlchemy 2.0 typed ORM: the database is the source of truth (design decision 1).

Tables: embedding spaces, studies, images (metadata, never direct identifiers), latents (z as fp16
bytes + shape, one per image and encoder), vectors (one per image and space), archive-fitted vector
transforms, ingest errors, and
ingest jobs (the queue that ``retrieval worker`` processes claim from).
The schema itself is created by Alembic (``migrations/``), never by ``create_all`` at runtime.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """Declarative base of every table."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Space(Base):
    """An embedding space: every vector belongs to exactly one (design decision 4)."""

    __tablename__ = "spaces"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    encoder_key: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(String(256))
    input_size: Mapped[int] = mapped_column(Integer)
    preprocessing: Mapped[str] = mapped_column(String(32))
    pooling: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, server_default=func.now())


class Study(Base):
    """A study groups images: DICOM StudyInstanceUID, a manifest's study column, or a folder."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_key: Mapped[str] = mapped_column(String(512), unique=True)
    study_uid: Mapped[str | None] = mapped_column(String(128), index=True)
    label: Mapped[str] = mapped_column(String(512))
    patient_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, server_default=func.now())

    images: Mapped[list[ImageRecord]] = relationship(back_populates="study", order_by="ImageRecord.id")


class ImageRecord(Base):
    """One stored image (one file; the first frame of a multi-frame DICOM)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    source_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    sop_uid: Mapped[str | None] = mapped_column(String(128), unique=True)
    series_uid: Mapped[str | None] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    body_part: Mapped[str | None] = mapped_column(String(64), index=True)
    view: Mapped[str | None] = mapped_column(String(32))
    laterality: Mapped[str | None] = mapped_column(String(8))
    study_date: Mapped[dt.date | None] = mapped_column(Date, index=True)
    patient_sex: Mapped[str | None] = mapped_column(String(8))
    patient_age: Mapped[str | None] = mapped_column(String(8))
    patient_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_hash: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # reconstruction quality (opt-in): PSNR (dB) and SSIM of decode(z) against the normalised input
    recon_psnr: Mapped[float | None] = mapped_column(Float, index=True)
    recon_ssim: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, server_default=func.now())

    study: Mapped[Study] = relationship(back_populates="images")


FILTER_COLUMNS = ("modality", "body_part", "view", "laterality", "patient_sex")
"""Filtered case-insensitively (``upper(coalesce(column, ''))``): each has an index on that expression, so a
selective cohort is found through it (``storage/cohorts.py``) instead of by scanning every image."""


def filter_expression(column: str) -> Any:
    """The expression a filter on ``column`` compares (and its index holds): ``upper(coalesce(column, ''))``."""
    return func.upper(func.coalesce(getattr(ImageRecord, column), literal_column("''")))


for _column in FILTER_COLUMNS:
    Index(f"ix_images_{_column}_filter", filter_expression(_column))


class Latent(Base):
    """The posterior-mode z of an image under one encoder (model + weights + input size)."""

    __tablename__ = "latents"
    __table_args__ = (UniqueConstraint("image_id", "encoder_key", name="uq_latents_image_encoder"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    encoder_key: Mapped[str] = mapped_column(String(64))
    shape: Mapped[str] = mapped_column(String(64))  # "C,h,w" (images) or "C,d,h,w" (volumes)
    dtype: Mapped[str] = mapped_column(String(16))  # "float16"
    data: Mapped[bytes] = mapped_column(LargeBinary)
    #: volumes: mm per voxel of the model input this z encodes (a z voxel spans f of them); None for images
    spacing: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    #: images: the stage-2 latent (z's shape, float16) computed at ingest, read by re-ranking instead of
    #: running the head per query; None for volumes (their pooled latent is z) and rows from before
    head: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class Vector(Base):
    """The pooled, L2-normalised vector of an image in one space (float32 bytes)."""

    __tablename__ = "vectors"
    __table_args__ = (
        UniqueConstraint("image_id", "space_id", name="uq_vectors_image_space"),
        Index("ix_vectors_space_id_id", "space_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    space_id: Mapped[int] = mapped_column(ForeignKey("spaces.id", ondelete="CASCADE"))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class VectorTransformRecord(Base):
    """An archive-fitted transform of pooled vectors (centring or PCA-whitening), named by its key in the
    pooling of the spaces that use it (``spp:1,2,4+whiten:<key>``; design decision 28)."""

    __tablename__ = "vector_transforms"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(32), unique=True)
    method: Mapped[str] = mapped_column(String(16))
    dim: Mapped[int] = mapped_column(Integer)
    mean: Mapped[bytes] = mapped_column(LargeBinary)  # float32 (dim,)
    matrix: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 (dim, dim); None for centring
    fitted_space: Mapped[str] = mapped_column(String(64))  # key of the space whose vectors it was fitted on
    fitted_vectors: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, server_default=func.now())


class IngestError(Base):
    """A file that could not be ingested, with the stage that failed and why."""

    __tablename__ = "ingest_errors"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    source: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, server_default=func.now())


class IngestJob(Base):
    """A queued bulk ingest of a server-side source, run by a ``retrieval worker`` process.

    ``state`` moves ``queued -> running -> succeeded | failed | cancelled``. A running job whose
    ``heartbeat_at`` is older than the stale limit is claimable again (its worker died); the ingest
    is idempotent, so the new attempt skips what the dead one stored. Counts are cumulative over
    attempts: ``ingested`` is what this job stored, ``skipped`` what was already in the archive.
    """

    __tablename__ = "ingest_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    #: the MedVAE model whose workers may run it (2-D and 3-D workers share one queue); None = any
    model: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    ingested: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    images_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
