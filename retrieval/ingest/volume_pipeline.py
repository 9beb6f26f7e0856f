"""Bulk ingest for the 3-D models: one vector per NIfTI file or DICOM series.

Same contract as the 2-D pipeline (:mod:`retrieval.ingest.pipeline`): idempotent by content hash (a
series' hash covers all its files; checked before decoding, so a re-run reads no voxels twice), one transaction per volume, one bad volume never stops the
run, failures recorded with their stage and reason. Volumes are encoded one at a time (their
shapes differ, and one already fills the encoder); the spacing of the model input is stored with z.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from retrieval.config import Settings
from retrieval.domain.items import SourceItem, printable_path
from retrieval.errors import RetrievalError, reason_of
from retrieval.imaging.preprocess import FittedVolume
from retrieval.imaging.volumes import (
    Volume,
    content_sha256,
    load_volume,
    scan_volumes,
    volume_metadata,
)
from retrieval.ingest.dicomweb import DicomwebQuery, DicomwebSource, is_dicomweb
from retrieval.ingest.prepare import study_of
from retrieval.ingest.report import SAME_CONTENT, STORED, Failure, IngestReport
from retrieval.service import SpaceService
from retrieval.storage.rows import NewImage


class PipelineContext(Protocol):
    """What the volume path uses of :class:`retrieval.ingest.pipeline.IngestPipeline` (no import: no cycle)."""

    service: SpaceService
    settings: Settings
    job_id: str | None
    volumes_seen: set[str]
    roots: list[Path] | None

    def should_stop(self) -> bool: ...

    def notify(self, report: IngestReport) -> None: ...


logger = logging.getLogger(__name__)


def ingest_volumes(pipeline: PipelineContext, source: str | Path, report: IngestReport) -> None:
    """Fill ``report`` with the ingest of every volume under ``source`` into the pipeline's 3-D space:
    a folder or NIfTI file, or a DICOMweb source (one volume per series)."""
    pipeline.volumes_seen = set()
    if is_dicomweb(source):
        _ingest_remote_series(pipeline, str(source), report)
        return
    items = scan_volumes(source, roots=pipeline.roots)
    report.total, report.phase = len(items), "ingesting"
    logger.info("ingest %s: %d candidate volumes into space %s", source, len(items), pipeline.service.space.key[:12])
    for item in items:
        if pipeline.should_stop():
            report.stopped = True
            break
        if item.error:
            report.failures.append(Failure(item.display, "read", item.error))
            continue
        _load_and_store(pipeline, item, report)
    pipeline.service.index.save()


def _ingest_remote_series(pipeline: PipelineContext, source: str, report: IngestReport) -> None:
    """DICOMweb into a 3-D space: each series not yet stored is fetched whole, assembled and encoded.

    Stored series are skipped by SeriesInstanceUID before any fetch (incremental sync); the
    fetched files live in a spool folder only while their series is processed.
    """
    service, settings = pipeline.service, pipeline.settings
    remote = DicomwebSource(DicomwebQuery.parse(source), settings)
    series = remote.list_series()
    report.total, report.phase = len(series), "ingesting"
    stored = service.store.series_in_space(service.space.id, [item.remote[1] for item, _ in series if item.remote])
    logger.info("ingest %s: %d series listed, %d already stored", remote.query.source_string(), len(series), len(stored))
    settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
    for item, instances in series:
        if pipeline.should_stop():
            report.stopped = True
            break
        assert item.remote is not None
        if item.remote[1] in stored:
            report.skip(STORED)
            continue
        with tempfile.TemporaryDirectory(prefix="series-", dir=settings.storage.spool_dir) as folder:
            try:
                with ThreadPoolExecutor(max_workers=settings.dicomweb.fetch_workers) as pool:
                    files = list(pool.map(lambda instance: str(remote.fetch(instance, Path(folder))), instances))
            except Exception as exc:  # noqa: BLE001 - a series that cannot be fetched whole is one failure
                report.failures.append(Failure(item.display, "fetch", reason_of(exc)))
                continue
            local = SourceItem(path=f"{folder}#{item.remote[1]}", uri=item.uri, row={"files": os.pathsep.join(files)})
            _load_and_store(pipeline, local, report)
    service.index.save()


def _load_and_store(pipeline: PipelineContext, item: SourceItem, report: IngestReport) -> None:
    """Read, fit, encode and store one volume item; failures are recorded, never raised."""
    store, space = pipeline.service.store, pipeline.service.space
    try:
        sha256 = content_sha256(item)
    except OSError as exc:
        report.failures.append(Failure(item.display, "read", f"cannot read file ({exc.strerror or exc})"))
        return
    if sha256 in pipeline.volumes_seen:
        report.skip(SAME_CONTENT)
        return
    if store.already_in_space(space.id, [sha256], []):
        report.skip(STORED)
        return
    tick = time.perf_counter()
    try:
        volume = load_volume(item, max_voxels=pipeline.settings.ingest.max_image_pixels)
        fitted = pipeline.service.fit_volume(volume)
    except RetrievalError as exc:
        report.failures.append(Failure(item.display, "decode", exc.message.removeprefix(f"{item.path}: ")))
        return
    except Exception as exc:  # noqa: BLE001 - one bad volume never stops the run
        report.failures.append(Failure(item.display, "decode", f"unexpected {type(exc).__name__}: {exc}"))
        return
    report.seconds["decode_cpu"] += time.perf_counter() - tick
    pipeline.volumes_seen.add(sha256)
    _store_volume(pipeline, item, volume, fitted, sha256, report)


def _store_volume(
    pipeline: PipelineContext, item: SourceItem, volume: Volume, fitted: FittedVolume, sha256: str,
    report: IngestReport,
) -> None:
    """Encode one fitted volume and store it (row, latent with its spacing, vector) in one transaction."""
    service, settings = pipeline.service, pipeline.settings
    tick = time.perf_counter()
    try:
        z, vectors = service.embed_pixels(fitted.voxels[None])
    except Exception as exc:  # noqa: BLE001
        logger.exception("encode failed for %s", item.display)
        report.failures.append(Failure(item.display, "encode", f"{type(exc).__name__}: {exc}"))
        return
    report.seconds["encode"] += time.perf_counter() - tick
    tick = time.perf_counter()
    metadata = volume_metadata(volume, secret=settings.privacy.id_secret, date_shift_days=settings.privacy.date_shift_days)
    location, _, series_uid = item.path.partition("#")
    resolved = Path(location).resolve()
    source_uri = item.uri or printable_path(resolved) + (f"#{series_uid}" if series_uid else "")
    if metadata.study_uid:
        study_key, study_label = study_of(item, metadata)
    elif series_uid:  # a DICOM series without StudyInstanceUID: its folder is the study
        study_key, study_label = f"folder:{printable_path(resolved)}", resolved.name
    else:  # a NIfTI file is its own study (one subject per file is the common layout)
        study_key, study_label = f"file:{printable_path(resolved)}", resolved.name
    x, y, slices = volume.voxels.shape
    row = NewImage(
        source_uri=source_uri,
        sha256=sha256,
        study_key=study_key,
        study_label=study_label,
        kind=volume.kind,
        width=x,
        height=y,
        frames=slices,
        metadata=metadata,
        z=z[0].numpy(),
        vector=vectors[0],
        quality=None,
        spacing=fitted.spacing,
    )
    try:
        also = service.fan_out(z) if service.extra_poolings else []  # a volume's pooled latent is z
        service.store.write_batch(space=service.space, images=[row], job_id=pipeline.job_id, also=also)
    except Exception as exc:  # noqa: BLE001 - the transaction rolled back; nothing was stored
        logger.exception("database write failed for %s", item.display)
        report.failures.append(Failure(item.display, "store", f"{type(exc).__name__}: {exc}"))
        return
    service.index.catch_up(service.store)
    report.seconds["write"] += time.perf_counter() - tick
    report.ingested += 1
    pipeline.notify(report)
