"""The ingest-job queue: a table in the archive's own database, claimed by ``retrieval worker``.

Contract:

* :meth:`JobQueue.submit` only records a job; workers run it. The API never encodes bulk jobs.
* :meth:`JobQueue.claim` hands a job to exactly one worker: the candidate is picked with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (several workers), and taken with a
  conditional ``UPDATE`` whose row count proves ownership (this also makes SQLite safe, where one
  worker is the supported setup). A ``running`` job whose heartbeat is older than
  ``stale_seconds`` is claimable again: its worker died, and the idempotent ingest resumes it.
* :meth:`JobQueue.heartbeat` writes progress only while the caller still owns the job, and tells
  it whether a cancel was requested.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from retrieval.config import Settings
from retrieval.domain.items import resolved_under
from retrieval.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from retrieval.imaging.volumes import is_nifti
from retrieval.storage.orm import IngestError, IngestJob
from retrieval.storage.store import Store

FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})
ORPHAN_CANCELLED = "cancelled; its worker had stopped reporting, so no batch was running"
MAX_LISTED_FAILURES = 200


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Progress:
    """What a worker reports for its job. ``ingested`` is not here: batch writes count it exactly."""

    total: int
    skipped: int
    failed: int
    images_per_second: float


def allowed_job_source(source: str, settings: Settings) -> str:
    """The source a job may run: a folder/manifest under the ingest roots, or an allow-listed DICOMweb URL.

    DICOMweb sources are checked against ``RETRIEVAL_DICOMWEB_ALLOWED_URLS`` (base URL, exact),
    so the API cannot be used to make the worker call arbitrary hosts. Returns the canonical source.
    """
    from retrieval.ingest.dicomweb import DicomwebQuery, is_dicomweb

    if not is_dicomweb(source):
        return allowed_source(source, settings.ingest.root_list)
    query = DicomwebQuery.parse(source)
    allowed = settings.dicomweb.allowed_url_list
    if query.base_url not in allowed:
        raise ForbiddenError(
            f"{query.base_url}: not a DICOMweb server jobs may sync from (RETRIEVAL_DICOMWEB_ALLOWED_URLS)",
            detail={"field": "source", "allowed_urls": allowed},
        )
    return query.source_string()


def allowed_source(source: str, roots: list[Path]) -> str:
    """Resolve ``source`` (symlinks included) and insist it lies under one of ``roots``.

    Raises :class:`ForbiddenError` when no roots are configured or the path escapes them, and
    :class:`InvalidRequestError` when it does not exist. Returns the resolved path.
    """
    if not roots:
        raise ForbiddenError(
            "server-side ingest is disabled: set RETRIEVAL_INGEST_ROOTS to the folders jobs may read",
            detail={"field": "source"},
        )
    if not source or "\x00" in source:
        raise InvalidRequestError("source must be a non-empty path", detail={"field": "source"})
    resolved = resolved_under(source, roots)
    if resolved is None:
        raise ForbiddenError(
            f"{source}: outside the allowed ingest roots",
            detail={"field": "source", "allowed_roots": [str(root) for root in roots]},
        )
    try:
        exists, is_dir = resolved.exists(), resolved.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise InvalidRequestError(f"{source}: not a usable path ({exc.strerror})", detail={"field": "source"}) from None
    if not exists:
        raise InvalidRequestError(f"{source}: no such file or folder", detail={"field": "source"})
    if not (is_dir or resolved.suffix.lower() == ".csv" or is_nifti(resolved)):
        raise InvalidRequestError(f"{source}: not a folder, a .csv manifest or a NIfTI volume", detail={"field": "source"})
    return str(resolved)


class JobQueue:
    """Job rows in the archive database; every method is its own short transaction."""

    def __init__(self, store: Store, *, stale_seconds: float = 60.0) -> None:
        self.store = store
        self.stale_seconds = stale_seconds

    # -- API side

    def submit(self, source: str, *, model: str | None = None) -> IngestJob:
        """Queue ``source``; with ``model``, only workers running that model take it."""
        job = IngestJob(
            id=uuid.uuid4().hex,
            source=source,
            model=model,
            state="queued",
            cancel_requested=False,
            attempts=0,
            total=0,
            ingested=0,
            skipped=0,
            failed=0,
            images_per_second=0.0,
            created_at=utcnow(),
        )
        with self.store.sessions.begin() as session:
            session.add(job)
        return job

    def get(self, job_id: str) -> IngestJob:
        with self.store.sessions() as session:
            job = session.get(IngestJob, job_id)
        if job is None:
            raise NotFoundError(f"ingest job {job_id} does not exist", detail={"job_id": job_id})
        return job

    def recent(self, limit: int = 50) -> list[IngestJob]:
        with self.store.sessions() as session:
            return list(session.scalars(select(IngestJob).order_by(IngestJob.created_at.desc()).limit(limit)))

    def failures(self, job_id: str, limit: int = MAX_LISTED_FAILURES) -> list[IngestError]:
        with self.store.sessions() as session:
            return list(
                session.scalars(
                    select(IngestError).where(IngestError.run_id == job_id).order_by(IngestError.id).limit(limit)
                )
            )

    def cancel(self, job_id: str) -> IngestJob:
        """Cancel a queued job at once; ask the worker of a running one to stop after its batch."""
        with self.store.sessions.begin() as session:
            job = session.get(IngestJob, job_id, with_for_update=True)
            if job is None:
                raise NotFoundError(f"ingest job {job_id} does not exist", detail={"job_id": job_id})
            if job.state in FINISHED_STATES:
                raise ConflictError(
                    f"ingest job {job_id} already {job.state}", detail={"job_id": job_id, "state": job.state}
                )
            now = utcnow()
            if job.state == "queued":
                job.state = "cancelled"
                job.finished_at = now
                job.message = "cancelled before a worker started it"
            elif _as_utc(job.heartbeat_at) < now - dt.timedelta(seconds=self.stale_seconds):
                job.state = "cancelled"  # no live worker would ever see the request
                job.finished_at = now
                job.message = ORPHAN_CANCELLED
            job.cancel_requested = True
        return job

    def counts_by_state(self) -> dict[str, int]:
        with self.store.sessions() as session:
            rows = session.execute(select(IngestJob.state, func.count()).group_by(IngestJob.state)).all()
        return {state: int(count) for state, count in rows}

    def totals(self) -> dict[str, int]:
        """Images ingested / skipped / failed over all jobs (for metrics)."""
        with self.store.sessions() as session:
            row = session.execute(
                select(func.sum(IngestJob.ingested), func.sum(IngestJob.skipped), func.sum(IngestJob.failed))
            ).one()
        return {"ingested": int(row[0] or 0), "skipped": int(row[1] or 0), "failed": int(row[2] or 0)}

    # -- worker side

    def _claimable(self, now: dt.datetime) -> Any:
        stale_before = now - dt.timedelta(seconds=self.stale_seconds)
        return or_(
            IngestJob.state == "queued",
            and_(IngestJob.state == "running", IngestJob.heartbeat_at < stale_before),
        )

    def claim(self, worker_id: str, *, model: str | None = None) -> IngestJob | None:
        """Take the oldest claimable job for ``worker_id`` (with ``model``: jobs of that model or of
        none), or return None when there is none."""
        now = utcnow()
        for_model = or_(IngestJob.model.is_(None), IngestJob.model == model) if model else IngestJob.model.is_(None)
        with self.store.sessions.begin() as session:
            # a cancel that reached a job whose worker then died (or left) ends here: nobody else would end it
            session.execute(
                update(IngestJob)
                .where(self._claimable(now), IngestJob.cancel_requested.is_(True))
                .values(state="cancelled", finished_at=now, message=ORPHAN_CANCELLED)
                .execution_options(synchronize_session=False)
            )
            candidate = session.scalar(
                select(IngestJob.id)
                .where(self._claimable(now), IngestJob.cancel_requested.is_(False), for_model)
                .order_by(IngestJob.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if candidate is None:
                return None
            taken = session.execute(
                update(IngestJob)
                .where(IngestJob.id == candidate, self._claimable(now))
                .values(
                    state="running",
                    worker_id=worker_id,
                    attempts=IngestJob.attempts + 1,
                    heartbeat_at=now,
                    started_at=now,
                    message=None,
                )
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount != 1:
                return None
            # failures are re-recorded by the new attempt
            session.execute(delete(IngestError).where(IngestError.run_id == candidate))
        return self.get(candidate)

    def heartbeat(self, job_id: str, worker_id: str, progress: Progress | None) -> tuple[bool, bool]:
        """Record liveness (and progress); returns ``(still_owner, cancel_requested)``."""
        owner = self._update_owned(job_id, worker_id, {"heartbeat_at": utcnow()}, progress)
        with self.store.sessions() as session:
            cancel = session.scalar(select(IngestJob.cancel_requested).where(IngestJob.id == job_id))
        return owner, bool(cancel)

    def finish(self, job_id: str, worker_id: str, *, state: str, message: str, progress: Progress | None) -> bool:
        """Move an owned running job to a final state; False when the caller no longer owns it."""
        assert state in FINISHED_STATES
        return self._update_owned(
            job_id, worker_id, {"state": state, "message": message[:4000], "finished_at": utcnow()}, progress
        )

    def release(self, job_id: str, worker_id: str, progress: Progress | None) -> None:
        """Give an owned job back to the queue (worker shutting down); another worker resumes it.

        A job whose cancel was requested is not given back: it ends ``cancelled``.
        """
        with self.store.sessions() as session:
            cancel = session.scalar(select(IngestJob.cancel_requested).where(IngestJob.id == job_id))
        if cancel:
            values = {"state": "cancelled", "finished_at": utcnow(), "message": "cancelled while its worker was stopping"}
        else:
            values = {"state": "queued", "worker_id": None, "message": "released by a stopping worker"}
        self._update_owned(job_id, worker_id, values, progress)

    def _update_owned(self, job_id: str, worker_id: str, values: dict[str, Any], progress: Progress | None) -> bool:
        """Update a running job only if ``worker_id`` still owns it; returns whether it did."""
        if progress is not None:
            values = {**values, **progress.__dict__}
        with self.store.sessions.begin() as session:
            result = session.execute(
                update(IngestJob)
                .where(IngestJob.id == job_id, IngestJob.worker_id == worker_id, IngestJob.state == "running")
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        return result.rowcount == 1


def job_json(job: IngestJob, failures: list[IngestError] | None = None) -> dict[str, Any]:
    """A job as the API and the CLI show it; timestamps are ISO 8601 in UTC."""
    out: dict[str, Any] = {
        "job_id": job.id,
        "source": job.source,
        "model": job.model,
        "state": job.state,
        "cancel_requested": bool(job.cancel_requested),
        "attempts": job.attempts,
        "counts": {"total": job.total, "ingested": job.ingested, "skipped": job.skipped, "failed": job.failed},
        "images_per_second": round(float(job.images_per_second or 0.0), 3),
        "message": job.message,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "heartbeat_at": _iso(job.heartbeat_at),
        "finished_at": _iso(job.finished_at),
    }
    if failures is not None:
        out["failures"] = [{"source": f.source, "stage": f.stage, "reason": f.reason} for f in failures]
    return out


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; we only ever store UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def _as_utc(value: dt.datetime | None) -> dt.datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    if value is None:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
