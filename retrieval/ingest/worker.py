"""``retrieval worker``: claims ingest jobs from the database and runs them.

Contract:

* One job at a time per worker process, run by the same idempotent :class:`IngestPipeline` as
  ``retrieval ingest`` (a resumed job skips what an earlier attempt stored).
* A heartbeat thread writes progress every ``job_heartbeat_seconds``; it stops the pipeline (between
  encoder batches) when the job's cancel is requested or another worker took the job over.
* ``stop()`` (SIGTERM / SIGINT) ends the current batch, gives the job back to the queue and exits.
  A worker killed outright simply stops heartbeating; after ``job_stale_seconds`` any worker
  resumes its job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from retrieval.ingest.pipeline import IngestPipeline
from retrieval.ingest.report import STORED, IngestReport
from retrieval.service import SpaceService
from retrieval.storage.jobs import JobQueue, Progress
from retrieval.storage.orm import IngestJob

logger = logging.getLogger(__name__)


class JobRun:
    """The state one job run shares between the pipeline thread and the heartbeat thread."""

    def __init__(self, job: IngestJob) -> None:
        self.job = job
        self.ingested_before = job.ingested  # exactly what earlier attempts committed
        self.report: IngestReport | None = None
        self.stop = threading.Event()
        self.cancelled = False
        self.lost = False  # another worker owns the job now

    def observe(self, report: IngestReport) -> None:
        self.report = report

    def summary(self) -> str:
        """The job's message: its counts over every attempt, as its counts columns hold them."""
        assert self.report is not None
        progress = self.progress()
        skipped = progress.skipped if progress is not None else 0
        reasons = dict(self.report.skip_reasons)  # what earlier attempts stored is ingested, not skipped, for the job
        reasons[STORED] = reasons.get(STORED, 0) - min(self.ingested_before, reasons.get(STORED, 0))
        reasons = {reason: count for reason, count in reasons.items() if count}
        return self.report.summary(ingested=self.ingested_before + self.report.ingested, skipped=skipped, skip_reasons=reasons)

    def progress(self) -> Progress | None:
        report = self.report
        if report is None:
            return None
        return Progress(
            total=report.total,
            skipped=max(0, report.skipped - self.ingested_before),
            failed=report.failed,
            images_per_second=report.images_per_second_live(),
        )


class Worker:
    """Polls the job queue and runs jobs until stopped."""

    def __init__(self, service: SpaceService, *, poll_seconds: float = 2.0, worker_id: str | None = None) -> None:
        self.service = service
        self.settings = service.settings
        self.queue = JobQueue(service.store, stale_seconds=self.settings.jobs.stale_seconds)
        self.poll_seconds = poll_seconds
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Ask the worker to finish its current batch, release its job and return from :meth:`run`."""
        self._stopping.set()

    def run(self, *, once: bool = False) -> int:
        """Process jobs; with ``once``, exit when the queue is empty. Returns how many jobs ran."""
        logger.info("worker %s: waiting for ingest jobs", self.worker_id)
        ran = 0
        while not self._stopping.is_set():
            job = self.queue.claim(self.worker_id, model=self.settings.model.name)
            if job is None:
                if once:
                    break
                self._stopping.wait(self.poll_seconds)
                continue
            self.run_job(job)
            ran += 1
        return ran

    def run_job(self, job: IngestJob) -> None:
        run = JobRun(job)
        logger.info("worker %s: job %s (attempt %d) from %s", self.worker_id, job.id, job.attempts, job.source)
        heartbeat = threading.Thread(target=self._heartbeat, args=(run,), daemon=True, name=f"heartbeat-{job.id[:8]}")
        heartbeat.start()
        pipeline = IngestPipeline(
            self.service,
            progress=run.observe,
            should_stop=lambda: run.stop.is_set() or self._stopping.is_set(),
            roots=self.service.settings.ingest.root_list,  # a job reads nothing outside them, links and manifests included
        )
        failure: str | None = None
        try:
            run.report = pipeline.run(job.source, job_id=job.id)
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the worker lives on
            logger.exception("job %s failed", job.id)
            failure = f"{type(exc).__name__}: {exc}"
        run.stop.set()  # end the heartbeat before the final state is written, so no late beat follows it
        heartbeat.join()
        if failure is not None:
            self.queue.finish(job.id, self.worker_id, state="failed", message=failure, progress=run.progress())
            return
        self._settle(run)

    def _settle(self, run: JobRun) -> None:
        """Record how the run ended: cancelled, released (worker stopping), lost, or succeeded."""
        job, report, progress = run.job, run.report, run.progress()
        assert report is not None
        if run.lost:
            logger.warning("job %s: taken over by another worker; leaving it", job.id)
        elif report.stopped and run.cancelled:
            self.queue.finish(job.id, self.worker_id, state="cancelled", message=f"cancelled: {run.summary()}",
                              progress=progress)
        elif report.stopped:
            self.queue.release(job.id, self.worker_id, progress)
            logger.info("job %s: released to the queue (worker stopping)", job.id)
        else:
            self.queue.finish(job.id, self.worker_id, state="succeeded", message=run.summary(), progress=progress)
            logger.info("job %s: %s", job.id, run.summary())

    def _heartbeat(self, run: JobRun) -> None:
        interval = self.settings.jobs.heartbeat_seconds
        while not run.stop.wait(interval):
            try:
                owner, cancel = self.queue.heartbeat(run.job.id, self.worker_id, run.progress())
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the job; retry next beat
                logger.exception("job %s: heartbeat failed", run.job.id)
                continue
            if cancel:
                run.cancelled = True
                run.stop.set()
            if not owner:
                run.lost = True
                run.stop.set()
