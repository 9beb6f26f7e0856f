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

import functools
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.domain.items import SourceItem, printable_path
from retrieval.domain.metadata import (
    ImageMetadata,
    dropped_manifest_columns,
)
from retrieval.errors import RetrievalError, reason_of
from retrieval.imaging import device_fit
from retrieval.imaging.decode import decode_path
from retrieval.imaging.device_codec import SYNTAXES, DeviceDecodeError, DeviceFrameCodec
from retrieval.ingest.dicomweb import DicomwebQuery, DicomwebSource, is_dicomweb
from retrieval.ingest.frame_slots import FrameSlots
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
from retrieval.ingest.stages import Stage, abandon
from retrieval.ingest.volume_pipeline import ingest_volumes
from retrieval.model.batching import stacked
from retrieval.query.previews import previews_for
from retrieval.query.quality import score_latents
from retrieval.service import SpaceService
from retrieval.storage.rows import NewImage
from retrieval.storage.store import StoredVector

logger = logging.getLogger(__name__)

CODEC_REFUSALS_TO_GIVE_UP = 4
"""Refused frames of one transfer syntax, none of it decoded, after which the device's codec is no longer given it."""


class _InProcessExecutor:
    """The Executor subset the pipeline uses, running in the calling process (decode_workers=0)."""

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        return map(fn, items)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """``fn(*args)`` now; its result (or error) in a done future."""
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - as a pool's future carries it
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


def decode_worker_count(setting: int, *, gpu_encoder: bool = False) -> int:
    """-1 = one worker per core beyond the first (the encoder's); at most 8 when the encoder runs on the CPU, where
    it is the bound (1.6 s per image against 0.06 s of decoding) and more workers would only take its cores."""
    if setting >= 0:
        return setting
    spare = max(1, (os.cpu_count() or 2) - 1)
    return spare if gpu_encoder else min(8, spare)


def make_executor(workers: int, *, frame_slots: int = 0) -> tuple[Executor | _InProcessExecutor, FrameSlots | None]:
    """A process pool whose workers import only the torch-free ``retrieval.ingest.prepare`` and end with this
    process, and (``frame_slots`` > 0) the shared-memory slots they hand decoded frames over in, if any fit."""
    if workers == 0:
        return _InProcessExecutor(), None
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["retrieval.ingest.prepare"])
    slots = FrameSlots.sized_for(context, wanted=frame_slots) if frame_slots else None
    # each worker ends with this process (a SIGKILL leaves no worker, forkserver or tracker behind),
    # and the workers decode large images one at a time (retrieval.imaging.decode_gate)
    executor = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=start_decode_worker,
        initargs=(os.getpid(), context.Lock(), slots.handle() if slots is not None else None),
    )
    return executor, slots


def _unspool(prepared: Prepared) -> None:
    """A fetched (spooled) remote instance is deleted once its pixels are decoded."""
    if prepared.item.remote is not None:
        Path(prepared.item.path).unlink(missing_ok=True)


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
    """What became of one batch: failed at ``stage`` (encode or store, nothing of it stored) with ``reason``; or
    encoded (``z`` its latents, ``rows`` and ``also`` what to store); then written (``written``: the vectors it
    stored in the space, not those stored before)."""

    stage: str = ""
    reason: str = ""
    z: Any = None
    rows: list[NewImage] = field(default_factory=list, repr=False)
    also: Any = field(default=None, repr=False)  # the extra poolings' vectors
    written: list[StoredVector] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # encode, quality, write

    @property
    def failed(self) -> bool:
        return bool(self.stage)


def encode_batch(service: SpaceService, batch: list[Prepared]) -> BatchOutcome:
    """Encode one batch of decoded images: latents, heads, vectors, the extra poolings' vectors, ``--quality``'s
    scores, as the rows to store. Never raises: a failing batch is reported, the run goes on."""
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    try:
        pixels = stacked([p.pixels for p in batch])  # every batched item decoded: z[i] is batch[i]
        z, heads, vectors = service.encode_for_storage(pixels)
        also = service.fan_out(heads) if service.extra_poolings else []
        seconds["encode"] = time.perf_counter() - tick
        quality: list[tuple[float, float] | None] | None = None
        if service.settings.ingest.quality:
            tick = time.perf_counter()
            quality = [*score_latents(service, z, pixels)]
            seconds["quality"] = time.perf_counter() - tick
        rows = new_images(batch, z, heads, vectors, quality)
    except Exception as exc:  # noqa: BLE001 - one batch failing never stops the run
        logger.exception("encode failed for a batch of %d", len(batch))
        return BatchOutcome(stage="encode", reason=f"{type(exc).__name__}: {exc}", seconds=seconds)
    return BatchOutcome(z=z, rows=rows, also=also, seconds=seconds)


def write_encoded(service: SpaceService, outcome: BatchOutcome, *, job_id: str | None = None) -> BatchOutcome:
    """Store an encoded batch (:func:`encode_batch`) in one transaction: ``outcome`` with ``written``, or failed at
    the ``store`` stage (rolled back). Never raises."""
    tick = time.perf_counter()
    try:
        outcome.written = service.store.write_batch(space=service.space, images=outcome.rows, job_id=job_id,
                                                    also=outcome.also)
    except Exception as exc:  # noqa: BLE001 - the transaction rolled back; nothing of the batch was stored
        logger.exception("database write failed for a batch of %d", len(outcome.rows))
        outcome.stage, outcome.reason = "store", reason_of(exc)
        return outcome
    outcome.seconds["write"] = time.perf_counter() - tick
    return outcome


def encode_and_write(service: SpaceService, batch: list[Prepared], *, job_id: str | None = None) -> BatchOutcome:
    """:func:`encode_batch` then :func:`write_encoded`, one after the other (the Ray encoder actors: Ray Data
    overlaps their batches; the local pipeline runs the two in stages of their own)."""
    outcome = encode_batch(service, batch)
    return outcome if outcome.failed else write_encoded(service, outcome, job_id=job_id)


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


@dataclass
class RunState:
    """What one run's stages share: its report, what it has seen, the batch being formed, the last index save."""

    report: IngestReport
    seen: SeenInRun
    batch: list[Prepared] = field(default_factory=list)
    last_save: float = field(default_factory=time.monotonic)
    codec_decoded: Counter[str] = field(default_factory=Counter)  # per transfer syntax: frames the device's codec decoded
    codec_refused: Counter[str] = field(default_factory=Counter)  # and frames it refused
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, batch: list[Prepared], outcome: BatchOutcome) -> None:
        """Record every image of a batch as failed at the outcome's stage, with its reason."""
        self.report.failures.extend(Failure(p.item.display, outcome.stage, outcome.reason) for p in batch)

    def add_seconds(self, spent: dict[str, float]) -> None:
        """Add to the report's step timings (stages on several threads add to the same ones)."""
        with self._lock:
            for step, seconds in spent.items():
                self.report.seconds[step] = self.report.seconds.get(step, 0.0) + seconds


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
        self.slots: FrameSlots | None = None  # where decode workers leave frames for the device to fit
        self.codec: DeviceFrameCodec | None = None  # decodes the compressed DICOM frames workers pass on (decision 39)

    def run(self, source: str | Path, *, job_id: str | None = None) -> IngestReport:
        """Ingest everything under ``source``; returns the report (failures included).

        A job passes its ``job_id``: it names the run in the ingest-errors table, and every batch
        write adds to the job's ``ingested`` count in its own transaction.

        The steps overlap (:mod:`retrieval.ingest.stages`): this thread fingerprints each chunk, skips what is
        stored and hands the rest to the decode workers; ``collect`` takes the decoded images in order, fits
        them on the device where the workers left that, and forms batches; ``encode`` encodes a batch while
        ``write`` stores the one before it, feeds the index and saves it every ``index_save_seconds``. A stop
        request ends the run between batches: batches already encoded are stored, what is decoded but
        unbatched is redone by the next run. The ``finally`` always ends the stages, saves the index and
        records the failures, also after a crash.
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
        batch_size = self.settings.model.batch_size
        workers = decode_worker_count(self.settings.ingest.decode_workers,
                                      gpu_encoder=self.service.encoder.device.type == "cuda")
        lookahead = 2 * batch_size + workers  # decoded images waiting for the encoder, at most
        fit_on_device = self.service.fits_on_device(self.settings.ingest.fit_device)
        self.codec = self.service.frame_codec(self.settings.ingest.fit_device, self.settings.ingest.frame_decoder)
        self.options = replace(self.options, fit_on_device=fit_on_device,
                               device_codec_syntaxes=SYNTAXES if self.codec is not None else frozenset())
        executor, self.slots = make_executor(workers, frame_slots=lookahead + 2 * workers if self.options.fit_on_device else 0)
        run = RunState(report=report, seen=SeenInRun())
        write = Stage("ingest-write", lambda outcome: self._write(outcome, run))
        encode = Stage("ingest-encode", lambda batch: self._encode(batch, run, write))
        collect = Stage("ingest-collect", lambda future: self._collect(future, run, encode), depth=lookahead)
        chunk_size = max(4 * batch_size, 32)
        try:
            for start in range(0, len(items), chunk_size):
                if report.stopped or self.should_stop():
                    report.stopped = True
                    break
                for fp in self._new_items(executor, items[start : start + chunk_size], report, run.seen):
                    if report.stopped:
                        break
                    collect.put(executor.submit(prepare, (fp, self.options)))
                self.notify(report)
            collect.close()
            if run.batch and not report.stopped:
                self._hand_on(run, encode)
            encode.close()
            write.close()
        except BaseException:  # an error or an interrupt: what is queued is dropped (the next run redoes it)
            abandon(collect, encode, write)
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            if self.slots is not None:
                self.slots.close()
                self.slots = None
            if self.spool is not None:
                shutil.rmtree(self.spool, ignore_errors=True)
                self.spool = None
            index.save()
            self._finish(report)
        logger.info("ingest %s: %s in %.1fs", report.run_id, report.summary(), report.seconds["wall"])
        return report

    def _collect(self, future: Future[Prepared], run: RunState, encode: Stage[list[Prepared]]) -> None:
        """Stage ``collect``: one decoded image (in submission order) into the next batch; a full batch to ``encode``."""
        report = run.report
        if report.stopped:
            future.cancel()
            return
        prepared = future.result()
        if prepared.pixels is None and not prepared.error and prepared.encoded is None:
            self._fit_on_device(prepared, run)
        if prepared.encoded is None:
            _unspool(prepared)
        run.add_seconds({"decode_cpu": prepared.seconds})
        if prepared.error:
            report.failures.append(Failure(prepared.item.display, "decode", prepared.error))
            return
        if not run.seen.first_decode(prepared.metadata.sop_uid):
            report.skip(SAME_SOP_UID)  # another file of this run already gave this SOP instance
            if prepared.encoded is not None:  # still spooled for its decode, which will not come
                _unspool(prepared)
            return
        run.batch.append(prepared)
        if len(run.batch) >= self.settings.model.batch_size:
            self._hand_on(run, encode)
            if self.should_stop():  # stop between batches; what is decoded but unstored is redone later
                report.stopped = True

    def _hand_on(self, run: RunState, encode: Stage[list[Prepared]]) -> None:
        """The batch formed so far to ``encode``, once the frames passed on compressed are decoded and fitted on the
        device, all in one call of its codec; those that fail there are the run's decode failures."""
        batch, run.batch = run.batch, []
        passed_on = [prepared for prepared in batch if prepared.encoded is not None]
        if passed_on:
            self._decode_on_device(passed_on, run)
            for prepared in passed_on:
                if prepared.error:
                    run.report.failures.append(Failure(prepared.item.display, "decode", prepared.error))
            batch = [prepared for prepared in batch if not prepared.error]
        if batch:
            encode.put(batch)

    def _encode(self, batch: list[Prepared], run: RunState, write: Stage[tuple[list[Prepared], BatchOutcome]]) -> None:
        """Stage ``encode``: one batch through the encoder, on to ``write``."""
        outcome = encode_batch(self.service, batch)
        run.add_seconds(outcome.seconds)
        if outcome.failed:
            run.fail(batch, outcome)
            return
        write.put((batch, outcome))

    def _write(self, encoded: tuple[list[Prepared], BatchOutcome], run: RunState) -> None:
        """Stage ``write``: store an encoded batch in one transaction, feed the index (and save it now and then)."""
        batch, outcome = encoded
        report = run.report
        outcome = write_encoded(self.service, outcome, job_id=self.job_id)
        if outcome.failed:
            run.fail(batch, outcome)
            return
        tick = time.perf_counter()
        # add what the database committed (ours and any concurrent writer's), never only ours
        self.service.index.catch_up(self.service.store)
        if self.previews:
            self._store_previews(batch, outcome.z)
        if time.monotonic() - run.last_save > self.index_save_seconds:
            self.service.index.save()
            run.last_save = time.monotonic()
        run.add_seconds({"write": outcome.seconds["write"] + time.perf_counter() - tick})
        report.ingested += len(batch)
        self.notify(report)

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

    def _fit_on_device(self, prepared: Prepared, run: RunState) -> None:
        """Map and fit a frame of stored values on the encoder's device, freeing its shared-memory slot; a failure
        is the image's decode failure."""
        slot, tick = prepared.frame_slot, time.perf_counter()
        try:
            slots = self.slots
            self._fit(prepared, lambda: slots.view(slot) if slot is not None and slots is not None else prepared.frame, run)
            run.report.shared_frames += slot is not None
        finally:
            if slot is not None and self.slots is not None:
                self.slots.release(slot)
            prepared.frame, prepared.frame_slot = None, None
            run.add_seconds({"device_fit": time.perf_counter() - tick})

    def _decode_on_device(self, passed_on: list[Prepared], run: RunState) -> None:
        """Decode the compressed frames of ``passed_on`` in one call of the device's codec, then map and fit each; a
        frame the codec refuses (a JPEG Lossless predictor nvJPEG lacks, a damaged stream) is decoded from its file
        on the CPU as a worker would have (the first one of a run is logged), and a file the CPU cannot decode either
        gets its decode failure in ``error``."""
        frames = [prepared.encoded for prepared in passed_on if prepared.encoded is not None]
        assert self.codec is not None and len(frames) == len(passed_on)
        tick = time.perf_counter()
        decoded = self.codec.decode_batch(frames)
        run.add_seconds({"device_decode": time.perf_counter() - tick})
        tick = time.perf_counter()
        for prepared, frame, values in zip(passed_on, frames, decoded, strict=True):
            try:
                if isinstance(values, DeviceDecodeError):
                    if not run.report.codec_fallbacks:
                        logger.warning("%s: %s; decoding it on the CPU (further frames the codec refuses are decoded "
                                       "there without a warning; the report counts them)", prepared.item.display, values)
                    run.report.codec_fallbacks += 1
                    run.codec_refused[frame.transfer_syntax] += 1
                    self._fit(prepared, functools.partial(self._decoded_on_cpu, prepared), run)
                else:
                    run.report.codec_frames += 1
                    run.codec_decoded[frame.transfer_syntax] += 1
                    self._fit(prepared, functools.partial(lambda tensor: tensor, values), run)
            finally:
                prepared.encoded = None
                _unspool(prepared)
        self._stop_passing_on_what_the_codec_refuses(run)
        run.add_seconds({"device_fit": time.perf_counter() - tick})

    def _stop_passing_on_what_the_codec_refuses(self, run: RunState) -> None:
        """A transfer syntax whose first :data:`CODEC_REFUSALS_TO_GIVE_UP` frames the codec all refused (nvJPEG
        lacks a JPEG Lossless predictor the archive uses, say) is no longer passed on: the decode workers decode the
        rest of it, in parallel, instead of this one thread decoding every frame again after a refusal. Frames
        already submitted to the workers still come passed on."""
        hopeless = {syntax for syntax, refused in run.codec_refused.items()
                    if refused >= CODEC_REFUSALS_TO_GIVE_UP and not run.codec_decoded[syntax]}
        if hopeless & self.options.device_codec_syntaxes:
            logger.warning("the GPU codec refused the first %d frames of transfer syntax %s and decoded none: the decode "
                           "workers decode the rest of them", CODEC_REFUSALS_TO_GIVE_UP, ", ".join(sorted(hopeless)))
            self.options = replace(self.options, device_codec_syntaxes=self.options.device_codec_syntaxes - hopeless)

    def _decoded_on_cpu(self, prepared: Prepared) -> np.ndarray:
        """A passed-on frame's stored values, decoded from its file here, as its worker would have."""
        decoded = decode_path(prepared.item.path, max_pixels=self.options.max_pixels, keep_stored_values=True)
        if decoded.unit != prepared.unit or decoded.pixels is None:
            raise DeviceDecodeError("decoded on the CPU, its values map otherwise than its worker read in its header")
        return decoded.pixels

    def _fit(self, prepared: Prepared, values_of: Callable[[], Any], run: RunState) -> None:
        """Map and fit a frame's stored values (``values_of()``: an array, or a tensor on the device) into
        ``prepared.pixels``; a failure, getting the values included, is the image's decode failure in ``prepared.error``."""
        try:
            prepared.pixels = device_fit.fit_frame(values_of(), prepared.unit, self.service.preprocessing.input_size,
                                                   self.service.encoder.device)
            run.report.device_frames += 1
        except RetrievalError as exc:  # the file's own decode failure, from the CPU decode after a codec refusal
            prepared.error = exc.message.removeprefix(f"{prepared.item.path}: ")
        except Exception as exc:  # noqa: BLE001 - one bad frame never stops the run
            prepared.error = f"cannot fit the image on {self.service.encoder.device} ({type(exc).__name__}: {exc})"

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
