"""Bulk ingest: scan -> fingerprint & skip -> decode (worker processes) -> encode -> store -> index.

Contract:

* Idempotent: an image whose sha256 or SOPInstanceUID already has a vector in the space is
  skipped, so a re-run is a no-op and an interrupted run resumes where it stopped.
* One database transaction per encoder batch; the index is fed from what was committed and saved
  every ``index_save_seconds`` and at the end. A crash between the two is repaired by the index's
  catch-up on next open (the database is the source of truth).
* One bad file never stops the run: each failure is recorded with its stage and reason.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.domain.items import SourceItem, printable_path
from retrieval.domain.metadata import (
    ImageMetadata,
    dropped_manifest_columns,
)
from retrieval.errors import reason_of
from retrieval.ingest.dicomweb import DicomwebQuery, DicomwebSource, is_dicomweb
from retrieval.ingest.prepare import (
    Fingerprint,
    Prepared,
    PrepareOptions,
    fingerprint,
    manifest_metadata,
    prepare,
    start_decode_worker,
)
from retrieval.ingest.report import (
    SAME_CONTENT,
    SAME_SOP_UID,
    STORED,
    Failure,
    IngestReport,
    ProgressCallback,
)
from retrieval.ingest.sources import scan
from retrieval.ingest.volume_pipeline import ingest_volumes
from retrieval.query.previews import previews_for
from retrieval.query.quality import score_latents
from retrieval.service import SpaceService
from retrieval.storage.rows import NewImage
from retrieval.storage.store import StoredVector

logger = logging.getLogger(__name__)


class _InProcessExecutor:
    """The Executor subset the pipeline uses, running in the calling process (decode_workers=0)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        return map(fn, items)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


def decode_worker_count(setting: int) -> int:
    """-1 = one worker per core beyond the first (the encoder's), capped at 8."""
    if setting >= 0:
        return setting
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_executor(workers: int) -> Executor | _InProcessExecutor:
    """A process pool whose workers import only the torch-free ``retrieval.ingest.prepare`` and end with this process."""
    if workers == 0:
        return _InProcessExecutor()
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["retrieval.ingest.prepare"])
    # each worker ends with this process (a SIGKILL leaves no worker, forkserver or tracker behind),
    # and the workers decode large images one at a time (retrieval.imaging.decode_gate)
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=start_decode_worker, initargs=(os.getpid(), context.Lock())
    )


def prepare_options(service: SpaceService) -> PrepareOptions:
    """How decode workers read and fit files for ``service``'s space (picklable: it travels to them)."""
    settings = service.settings
    return PrepareOptions(
        preprocessing=service.preprocessing,
        max_pixels=settings.ingest.max_image_pixels,
        id_secret=settings.privacy.id_secret,
        date_shift_days=settings.privacy.date_shift_days,
        manifest_columns=settings.ingest.manifest_column_set,
    )


def new_images(batch: list[Prepared], z: Any, heads: Any, vectors: np.ndarray,
               quality: list[tuple[float, float] | None] | None = None) -> list[NewImage]:
    """The rows to store for an encoded batch: ``z[i]``, ``heads[i]`` and ``vectors[i]`` belong to ``batch[i]``."""
    return [
        NewImage(
            source_uri=p.item.uri or printable_path(Path(p.item.path).resolve()),
            sha256=p.sha256,
            study_key=p.study_key,
            study_label=p.study_label,
            kind=p.kind,
            width=p.width,
            height=p.height,
            frames=p.frames,
            metadata=p.metadata,
            z=z[i].numpy(),
            vector=vectors[i],
            quality=quality[i] if quality is not None else None,
            head=heads[i].numpy() if heads is not None else None,
        )
        for i, p in enumerate(batch)
    ]


@dataclass
class BatchOutcome:
    """What became of one batch: failed at ``stage`` (encode or store, nothing of it stored) with ``reason``, or
    written (``written``: the vectors it stored in the space, not those stored before; ``z`` its latents)."""

    stage: str = ""
    reason: str = ""
    z: Any = None
    written: list[StoredVector] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # encode, quality, write

    @property
    def failed(self) -> bool:
        return bool(self.stage)


def encode_and_write(service: SpaceService, batch: list[Prepared], *, job_id: str | None = None) -> BatchOutcome:
    """Encode one batch of decoded images (latents, heads, vectors, the extra poolings' vectors, ``--quality``'s
    scores) and store it in one transaction. Never raises: a failing batch is reported, the run goes on. Shared by
    the local pipeline and the Ray encoder actors."""
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    try:
        pixels = np.stack([p.pixels for p in batch])  # every batched item decoded: z[i] is batch[i]
        z, heads, vectors = service.encode_for_storage(pixels)
        also = service.fan_out(heads) if service.extra_poolings else []
        seconds["encode"] = time.perf_counter() - tick
        quality: list[tuple[float, float] | None] | None = None
        if service.settings.ingest.quality:
            tick = time.perf_counter()
            quality = [*score_latents(service, z, pixels)]
            seconds["quality"] = time.perf_counter() - tick
    except Exception as exc:  # noqa: BLE001 - one batch failing never stops the run
        logger.exception("encode failed for a batch of %d", len(batch))
        return BatchOutcome(stage="encode", reason=f"{type(exc).__name__}: {exc}", seconds=seconds)
    tick = time.perf_counter()
    try:
        written = service.store.write_batch(space=service.space, images=new_images(batch, z, heads, vectors, quality),
                                            job_id=job_id, also=also)
    except Exception as exc:  # noqa: BLE001 - the transaction rolled back; nothing of the batch was stored
        logger.exception("database write failed for a batch of %d", len(batch))
        return BatchOutcome(stage="store", reason=reason_of(exc), seconds=seconds)
    seconds["write"] = time.perf_counter() - tick
    return BatchOutcome(z=z, written=written, seconds=seconds)


@dataclass
class SeenInRun:
    """What one run has already taken: file contents queued for decoding, SOP instances decoded."""

    content: set[str] = field(default_factory=set)
    decoded_sop_uids: set[str] = field(default_factory=set)

    def first_decode(self, sop_uid: str | None) -> bool:
        """Record a decoded SOP instance; False when this run already decoded it from another file."""
        if sop_uid is None:
            return True
        if sop_uid in self.decoded_sop_uids:
            return False
        self.decoded_sop_uids.add(sop_uid)
        return True


class IngestPipeline:
    """Runs one ingest of one source into the service's configured space."""

    def __init__(
        self,
        service: SpaceService,
        *,
        progress: ProgressCallback | None = None,
        index_save_seconds: float = 30.0,
        should_stop: Callable[[], bool] | None = None,
        roots: list[Path] | None = None,
        previews: bool = False,
    ) -> None:
        self.service = service
        self.previews = previews  # decode each batch's previews into the space's preview store as it is stored
        self.roots = roots  # API jobs: every local file read must resolve under one of these
        self.settings = service.settings
        self.progress = progress
        self.index_save_seconds = index_save_seconds
        self.should_stop = should_stop or (lambda: False)
        self.job_id: str | None = None
        self.remote: DicomwebSource | None = None
        self.spool: Path | None = None  # where fetched remote instances wait for decoding
        self.volumes_seen: set[str] = set()  # 3-D: content hashes stored by this run
        self.options = prepare_options(service)

    def run(self, source: str | Path, *, job_id: str | None = None) -> IngestReport:
        """Ingest everything under ``source``; returns the report (failures included).

        A job passes its ``job_id``: it names the run in the ingest-errors table, and every batch
        write adds to the job's ``ingested`` count in its own transaction.

        Over 60 lines on purpose: the chunk loop, the batch flush, the periodic index save, the stop
        checks and the ``finally`` that always saves the index and records failures are one piece
        of crash-safety logic that reads best in one place.
        """
        self.job_id = job_id
        report = IngestReport(run_id=job_id or uuid.uuid4().hex[:12], source=printable_path(source))
        self.remote = None
        if self.service.is_volume_space:
            return self._run_volumes(source, report)
        if is_dicomweb(source):
            self.remote = DicomwebSource(DicomwebQuery.parse(str(source)), self.settings)
            source = self.remote.query.source_string()
            items = self.remote.list_items()
        else:
            items = self._scanned(source, report)
        report.total, report.phase = len(items), "ingesting"
        report.dropped_columns = dropped_manifest_columns({c for item in items for c in item.row}, self.options.manifest_columns)
        if report.dropped_columns:
            logger.warning("manifest columns not stored: %s (name one in RETRIEVAL_MANIFEST_COLUMNS to keep it)",
                           ", ".join(report.dropped_columns))
        space, index = self.service.space, self.service.index  # load model + index before timing work
        report.seconds["load"] = time.perf_counter() - report.started
        report.started = time.perf_counter()
        logger.info("ingest %s: %d candidate files into space %s", source, len(items), space.key[:12])
        executor = make_executor(decode_worker_count(self.settings.ingest.decode_workers))
        last_save = time.monotonic()
        seen = SeenInRun()
        batch: list[Prepared] = []
        chunk_size = max(4 * self.settings.model.batch_size, 32)
        try:
            for start in range(0, len(items), chunk_size):
                if self.should_stop():
                    report.stopped = True
                    break
                chunk = items[start : start + chunk_size]
                todo = self._new_items(executor, chunk, report, seen)
                tasks = [(fp, self.options) for fp in todo]
                for prepared in self._prepared(executor, tasks):
                    report.seconds["decode_cpu"] += prepared.seconds
                    if prepared.error:
                        report.failures.append(Failure(prepared.item.display, "decode", prepared.error))
                        continue
                    if not seen.first_decode(prepared.metadata.sop_uid):
                        report.skip(SAME_SOP_UID)  # another file of this run already gave this SOP instance
                        continue
                    batch.append(prepared)
                    if len(batch) >= self.settings.model.batch_size:
                        self._flush(batch, report)
                        batch = []
                        if time.monotonic() - last_save > self.index_save_seconds:
                            index.save()
                            last_save = time.monotonic()
                        if self.should_stop():  # stop between batches; what is decoded but unstored is redone later
                            report.stopped = True
                            break
                if report.stopped:
                    break
                self.notify(report)
            if batch and not report.stopped:
                self._flush(batch, report)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            if self.spool is not None:
                shutil.rmtree(self.spool, ignore_errors=True)
                self.spool = None
            index.save()
            self._finish(report)
        logger.info("ingest %s: %s in %.1fs", report.run_id, report.summary(), report.seconds["wall"])
        return report

    def _scanned(self, source: str | Path, report: IngestReport) -> list[SourceItem]:
        """The source's items, reporting how many were found every second while a large folder is listed."""
        items: list[SourceItem] = []
        last = time.monotonic()
        for item in scan(source, roots=self.roots):
            items.append(item)
            if time.monotonic() - last > 1.0:
                report.total, last = len(items), time.monotonic()
                self.notify(report)
        return items

    def _run_volumes(self, source: str | Path, report: IngestReport) -> IngestReport:
        """3-D models: NIfTI files and DICOM series, one vector each (:mod:`retrieval.ingest.volume_pipeline`)."""
        try:
            ingest_volumes(self, source, report)
        finally:
            self._finish(report)
        logger.info("ingest %s: %s in %.1fs", report.run_id, report.summary(), report.seconds["wall"])
        return report

    def _finish(self, report: IngestReport) -> None:
        """Record the run's failures, close its clock and report it one last time (also after a crash)."""
        self.service.store.record_errors(
            run_id=report.run_id, failures=[(f.source, f.stage, f.reason) for f in report.failures]
        )
        report.seconds["wall"] = time.perf_counter() - report.started
        self.notify(report)

    def _prepared(self, executor: Any, tasks: list[tuple[Fingerprint, PrepareOptions]]) -> Iterator[Prepared]:
        """Decode a chunk's new files; fetched (spooled) files are deleted once decoded."""
        for prepared in executor.map(prepare, tasks, chunksize=2):
            if prepared.item.remote is not None:
                Path(prepared.item.path).unlink(missing_ok=True)
            yield prepared

    def _new_items(
        self, executor: Any, chunk: list[SourceItem], report: IngestReport, seen: SeenInRun
    ) -> list[Fingerprint]:
        """Fingerprint a chunk and keep what is neither stored in the space nor seen in this run.

        Items whose SOPInstanceUID the source already listed are checked first, so a stored
        remote instance is skipped without being fetched. Within a run, a file is skipped here
        for content already queued, or for a SOP instance already *decoded*: a file that fails to
        decode never hides a good file with the same SOPInstanceUID.
        """
        chunk = self._skip_listed_uids(chunk, report, seen)
        chunk = self._fetch_remote(chunk, report)
        prints: list[Fingerprint] = list(executor.map(fingerprint, chunk, chunksize=8))
        good = [fp for fp in prints if not fp.error]
        for fp in prints:
            if fp.error:
                report.failures.append(Failure(fp.item.display, "read", fp.error))
        stored = self.service.store.already_in_space(
            self.service.space.id, [fp.sha256 for fp in good], [fp.sop_uid for fp in good if fp.sop_uid]
        )
        todo: list[Fingerprint] = []
        manifest_rows: list[tuple[str, ImageMetadata]] = []
        for fp in good:
            keys = {fp.sha256} | ({fp.sop_uid} if fp.sop_uid else set())
            if keys & stored or fp.sha256 in seen.content or fp.sop_uid in seen.decoded_sop_uids:
                report.skip(STORED if keys & stored else SAME_CONTENT if fp.sha256 in seen.content else SAME_SOP_UID)
                if fp.item.row and fp.sha256 in stored:  # a manifest for stored images: its metadata still applies
                    manifest_rows.append((fp.sha256, manifest_metadata(fp.item.row, self.options)))
                continue
            seen.content.add(fp.sha256)
            todo.append(fp)
        if manifest_rows:
            report.updated += self.service.store.apply_manifest_metadata(manifest_rows)
        return todo


    def _skip_listed_uids(self, chunk: list[SourceItem], report: IngestReport, seen: SeenInRun) -> list[SourceItem]:
        listed = [item.sop_uid for item in chunk if item.sop_uid]
        if not listed:
            return chunk
        stored = self.service.store.already_in_space(self.service.space.id, [], listed)
        kept = []
        for item in chunk:
            if item.sop_uid and (item.sop_uid in stored or item.sop_uid in seen.decoded_sop_uids):
                report.skip(STORED if item.sop_uid in stored else SAME_SOP_UID)
                continue
            kept.append(item)
        return kept

    def _fetch_remote(self, chunk: list[SourceItem], report: IngestReport) -> list[SourceItem]:
        """Fetch remote items into the spool folder (concurrently); a failed fetch is a ``fetch`` failure."""
        remote = [item for item in chunk if item.remote is not None and not item.error]
        if not remote or self.remote is None:
            return chunk
        if self.spool is None:
            self.settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
            self.spool = Path(tempfile.mkdtemp(prefix="dicomweb-", dir=self.settings.storage.spool_dir))
        source, spool = self.remote, self.spool

        def fetch(item: SourceItem) -> SourceItem | None:
            try:
                item.path = str(source.fetch(item, spool))
                return item
            except Exception as exc:  # noqa: BLE001 - one instance failing never stops a sync
                report.failures.append(Failure(item.display, "fetch", reason_of(exc)))
                return None

        with ThreadPoolExecutor(max_workers=self.settings.dicomweb.fetch_workers) as pool:
            fetched = {id(item): item for item in pool.map(fetch, remote) if item is not None}
        return [item for item in chunk if item.remote is None or id(item) in fetched]

    def _flush(self, batch: list[Prepared], report: IngestReport) -> None:
        """Encode one batch and store it in one transaction; failures are per batch stage."""
        outcome = encode_and_write(self.service, batch, job_id=self.job_id)
        for step, spent in outcome.seconds.items():
            report.seconds[step] = report.seconds.get(step, 0.0) + spent
        if outcome.failed:
            report.failures.extend(Failure(p.item.display, outcome.stage, outcome.reason) for p in batch)
            return
        tick = time.perf_counter()
        # add what the database committed (ours and any concurrent writer's), never only ours
        self.service.index.catch_up(self.service.store)
        if self.previews:
            self._store_previews(batch, outcome.z)
        report.seconds["write"] += time.perf_counter() - tick
        report.ingested += len(batch)
        self.notify(report)

    def _store_previews(self, batch: list[Prepared], z: Any) -> None:
        """``--previews``: decode the batch's latents at once and keep them as the space's previews."""
        try:
            pixels = self.service.encoder.decode(z)
            ids = {image.sha256: image.id for image in self.service.store.images_by_sha256([p.sha256 for p in batch])}
            store = previews_for(self.service)
            for prepared, decoded in zip(batch, pixels, strict=True):
                store.write(ids[prepared.sha256], decoded)
        except Exception:  # noqa: BLE001 - previews are a convenience: the images are stored; they decode on demand
            logger.exception("could not store the previews of a batch of %d", len(batch))

    def notify(self, report: IngestReport) -> None:
        if self.progress is not None:
            self.progress(report)
