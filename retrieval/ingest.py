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
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.prepare import Fingerprint, Prepared, PrepareOptions, fingerprint, prepare
from retrieval.service import RetrievalService
from retrieval.sources import SourceItem, scan
from retrieval.store import NewImage

logger = logging.getLogger(__name__)


@dataclass
class Failure:
    source: str
    stage: str
    reason: str


@dataclass
class IngestReport:
    run_id: str
    total: int = 0
    ingested: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: {"decode_cpu": 0.0, "encode": 0.0, "write": 0.0, "wall": 0.0}
    )
    started: float = field(default_factory=time.perf_counter)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        return self.ingested / self.seconds["wall"] if self.seconds["wall"] > 0 else 0.0

    def images_per_second_live(self) -> float:
        """Rate so far, while the run is still going."""
        elapsed = time.perf_counter() - self.started
        return self.ingested / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        return f"ingested {self.ingested}, skipped {self.skipped}, failed {self.failed}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "total": self.total,
            "ingested": self.ingested,
            "skipped": self.skipped,
            "failed": self.failed,
            "images_per_second": round(self.images_per_second, 3),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "failures": [f.__dict__ for f in self.failures],
        }


ProgressCallback = Callable[[IngestReport], None]


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
    """A process pool whose workers import only the torch-free ``retrieval.prepare``."""
    if workers == 0:
        return _InProcessExecutor()
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["retrieval.prepare"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


class IngestPipeline:
    """Runs one ingest of one source into the service's configured space."""

    def __init__(
        self,
        service: RetrievalService,
        *,
        progress: ProgressCallback | None = None,
        index_save_seconds: float = 30.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.service = service
        self.settings = service.settings
        self.progress = progress
        self.index_save_seconds = index_save_seconds
        self.should_stop = should_stop or (lambda: False)
        self.options = PrepareOptions(
            input_size=self.settings.input_size,
            max_pixels=self.settings.max_image_pixels,
            id_secret=self.settings.id_secret,
        )

    def run(self, source: str | Path) -> IngestReport:
        """Ingest everything under ``source``; returns the report (failures included)."""
        report = IngestReport(run_id=uuid.uuid4().hex[:12])
        items = list(scan(source))
        report.total = len(items)
        space, index = self.service.space, self.service.index  # load model + index before timing work
        report.seconds["load"] = time.perf_counter() - report.started
        report.started = time.perf_counter()
        logger.info("ingest %s: %d candidate files into space %s", source, len(items), space.key[:12])
        executor = make_executor(decode_worker_count(self.settings.decode_workers))
        last_save = time.monotonic()
        seen: set[str] = set()
        batch: list[Prepared] = []
        chunk_size = max(4 * self.settings.batch_size, 32)
        try:
            for start in range(0, len(items), chunk_size):
                if self.should_stop():
                    break
                chunk = items[start : start + chunk_size]
                todo = self._new_items(executor, chunk, report, seen)
                tasks = [(fp, self.options) for fp in todo]
                for prepared in executor.map(prepare, tasks, chunksize=2):
                    report.seconds["decode_cpu"] += prepared.seconds
                    if prepared.error:
                        report.failures.append(Failure(prepared.item.path, "decode", prepared.error))
                        continue
                    batch.append(prepared)
                    if len(batch) >= self.settings.batch_size:
                        self._flush(batch, report)
                        batch = []
                        if time.monotonic() - last_save > self.index_save_seconds:
                            index.save()
                            last_save = time.monotonic()
                self._notify(report)
            if batch:
                self._flush(batch, report)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            index.save()
            self.service.store.record_errors(
                run_id=report.run_id, failures=[(f.source, f.stage, f.reason) for f in report.failures]
            )
            report.seconds["wall"] = time.perf_counter() - report.started
            self._notify(report)
        logger.info("ingest %s: %s in %.1fs", report.run_id, report.summary(), report.seconds["wall"])
        return report

    def _new_items(
        self, executor: Any, chunk: list[SourceItem], report: IngestReport, seen: set[str]
    ) -> list[Fingerprint]:
        """Fingerprint a chunk and keep what is neither stored in the space nor seen in this run."""
        prints: list[Fingerprint] = list(executor.map(fingerprint, chunk, chunksize=8))
        good = [fp for fp in prints if not fp.error]
        for fp in prints:
            if fp.error:
                report.failures.append(Failure(fp.item.path, "read", fp.error))
        stored = self.service.store.already_in_space(
            self.service.space.id, [fp.sha256 for fp in good], [fp.sop_uid for fp in good if fp.sop_uid]
        )
        todo: list[Fingerprint] = []
        for fp in good:
            keys = {fp.sha256} | ({fp.sop_uid} if fp.sop_uid else set())
            if keys & stored or keys & seen:
                report.skipped += 1
                continue
            seen.update(keys)
            todo.append(fp)
        return todo

    def _flush(self, batch: list[Prepared], report: IngestReport) -> None:
        """Encode one batch and store it in one transaction; failures are per batch stage."""
        tick = time.perf_counter()
        try:
            # every batched item decoded (errors never enter a batch); no filter here, so z[i] is batch[i]
            pixels = np.stack([p.pixels for p in batch])
            z, vectors = self.service.embed_pixels(pixels)
        except Exception as exc:  # noqa: BLE001 - record and carry on with the next batch
            logger.exception("encode failed for a batch of %d", len(batch))
            report.failures.extend(Failure(p.item.path, "encode", f"{type(exc).__name__}: {exc}") for p in batch)
            return
        report.seconds["encode"] += time.perf_counter() - tick
        tick = time.perf_counter()
        rows = [
            NewImage(
                source_uri=str(Path(p.item.path).resolve()),
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
            )
            for i, p in enumerate(batch)
        ]
        try:
            written = self.service.store.write_batch(space=self.service.space, images=rows)
        except Exception as exc:  # noqa: BLE001 - the transaction rolled back; nothing was stored
            logger.exception("database write failed for a batch of %d", len(batch))
            report.failures.extend(Failure(p.item.path, "store", f"{type(exc).__name__}: {exc}") for p in batch)
            return
        self.service.index.add(written)
        report.seconds["write"] += time.perf_counter() - tick
        report.ingested += len(batch)
        self._notify(report)

    def _notify(self, report: IngestReport) -> None:
        if self.progress is not None:
            self.progress(report)
