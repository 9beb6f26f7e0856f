"""Ingest on Ray Data: the single-machine pipeline's stages as Ray Data operators over a cluster.

    listing (driver) -> fingerprint + skip what is stored (CPU tasks) -> decode (CPU tasks)
      -> encode + store (one actor per GPU, ``num_gpus=1``; one CPU actor on a cluster without GPUs)
      -> outcomes (driver: the report, the index catch-up)

Every node reads the source's files by the same path (a shared filesystem) and writes into the same
PostgreSQL. The guarantees are those of :class:`~retrieval.ingest.pipeline.IngestPipeline`:

* **Idempotent.** Files whose sha256 or SOPInstanceUID already has a vector in the space are skipped
  before decoding, so a re-run stores only what is missing.
* **Nothing lost, nothing doubled.** Each encoder batch is one transaction
  (:meth:`~retrieval.storage.store.Store.write_batch`), which reuses an image already present. Ray
  restarts a killed worker and retries its batch (Ray Data's default for tasks and for the actors of a
  map stage): a batch that died before its commit is written by the retry; one that died after it is
  found stored and counted as skipped. A killed driver ends the run; the next run resumes it.
* **The index is a cache.** Workers never touch an index file: the driver catches the space's index up
  from the database at the end, as any API replica does on its next search.
* **One bad file never stops the run**: every listed file comes out of the pipeline as exactly one
  outcome row (stored, skipped or failed with its stage and reason).

SQLite is refused: one file on one machine cannot take writers from a cluster.
"""

from __future__ import annotations

import functools
import logging
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.config import Settings
from retrieval.domain.items import SourceItem, printable_path
from retrieval.errors import (
    ClusterUnavailableError,
    ConfigurationError,
    InvalidRequestError,
)
from retrieval.ingest.dicomweb import is_dicomweb
from retrieval.ingest.prepare import (
    Prepared,
    PrepareOptions,
    fingerprint,
    manifest_metadata,
    prepare,
)
from retrieval.ingest.report import (
    SAME_CONTENT,
    STORED,
    Failure,
    IngestReport,
)
from retrieval.ingest.sources import scan
from retrieval.storage.store import Store

if TYPE_CHECKING:
    from retrieval.service import SpaceService

logger = logging.getLogger(__name__)

FINGERPRINT_BATCH = 64
"""Files fingerprinted and checked against the database per task (one SQL query per batch)."""
DECODE_BATCH = 8
"""Files decoded per task."""
DECODE_TASK_MEMORY = 2**30
"""Memory a decode task reserves on its node: the measured peak of decoding one image of the largest allowed size
(8944 x 8944, about 0.9 GB; bench/results/decode-memory-2026-11-30.json), so a node never runs more decodes than
its memory holds. (On one machine a lock plays this part: retrieval/imaging/decode_gate.py.)"""

# outcome column values; "todo" and "decoded" are intermediate, the other three are final
TODO, DECODED, STORED_NOW, SKIPPED, FAILED = "todo", "decoded", "stored", "skipped", "failed"


def check_ray_settings(settings: Settings, source: str) -> None:
    """Refuse what a cluster cannot do, before starting one: SQLite, DICOMweb sources, volume spaces."""
    if not (settings.storage.database_url or "").startswith("postgresql"):
        raise InvalidRequestError(
            "--ray needs PostgreSQL: a cluster's workers write into one shared database, and SQLite is a file on one "
            "machine; set RETRIEVAL_DATABASE_URL=postgresql://user@host/db (or run ingest without --ray)",
            detail={"field": "database_url"})
    if is_dicomweb(source):
        raise InvalidRequestError(
            "--ray ingests files that every node can read (a shared folder or manifest); sync DICOMweb without --ray",
            detail={"field": "source"})
    if settings.model.dims == 3:
        raise InvalidRequestError("--ray ingests 2-D images; ingest volumes (3-D models) without --ray",
                                  detail={"field": "model"})


@functools.lru_cache(maxsize=4)
def _worker_store(settings_blob: bytes) -> Store:
    """One store (connection pool) per worker process and database, reused by every task it runs."""
    return Store.open(pickle.loads(settings_blob), migrate=False)


def fingerprint_and_skip(batch: dict[str, np.ndarray], *, settings_blob: bytes, space_id: int,
                         options: PrepareOptions) -> dict[str, Any]:
    """CPU stage 1: hash each file (and read its SOPInstanceUID); keep what the space does not hold yet.

    Files that share content within the batch are decoded once; across batches the store merges them. A
    manifest's metadata still applies to its stored images (``updated``), as without Ray.
    """
    store = _worker_store(settings_blob)
    items: list[SourceItem] = [pickle.loads(blob) for blob in batch["payload"]]
    prints = [fingerprint(item) for item in items]
    good = [fp for fp in prints if not fp.error]
    stored = store.already_in_space(space_id, [fp.sha256 for fp in good], [fp.sop_uid for fp in good if fp.sop_uid])
    seen: set[str] = set()
    rows = _Rows()
    manifest_rows = [(fp.sha256, manifest_metadata(fp.item.row, options))
                     for fp in good if fp.item.row and fp.sha256 in stored]
    updated = store.apply_manifest_metadata(manifest_rows) if manifest_rows else 0
    for fp in prints:
        if fp.error:
            rows.add(fp.item.display, FAILED, "read", fp.error)
        elif {fp.sha256, fp.sop_uid} & stored:
            rows.add(fp.item.display, SKIPPED, "", STORED)
        elif fp.sha256 in seen:
            rows.add(fp.item.display, SKIPPED, "", SAME_CONTENT)
        else:
            seen.add(fp.sha256)
            rows.add(fp.item.display, TODO, "", "", pickle.dumps(fp))
    if rows.updated:
        rows.updated[0] = updated  # counted once per batch, on its first row
    return rows.columns()


def decode(batch: dict[str, np.ndarray], *, options: PrepareOptions) -> dict[str, Any]:
    """CPU stage 2: read and fit the pixels of each new file (``todo`` rows); other rows pass through."""
    rows = _Rows()
    for display, outcome, stage, reason, payload, updated in _each(batch):
        if outcome != TODO:
            rows.add(display, outcome, stage, reason, updated=updated)
            continue
        prepared = prepare((pickle.loads(payload), options))
        if prepared.error:
            rows.add(display, FAILED, "decode", prepared.error, updated=updated)
        else:
            rows.add(display, DECODED, "", "", pickle.dumps(prepared), decode_seconds=prepared.seconds, updated=updated)
    return rows.columns()


class EncodeAndStore:
    """GPU stage: encode a batch of decoded images and store it in one transaction (a Ray Data actor).

    One per GPU, each loading the model once; the batch size is ``RETRIEVAL_BATCH_SIZE``. Reconstruction
    quality (``RETRIEVAL_INGEST_QUALITY``) and extra poolings are computed here too, as without Ray.
    """

    def __init__(self, settings_blob: bytes) -> None:
        from retrieval.service import SpaceService

        self.service = SpaceService(pickle.loads(settings_blob))
        self.service.space  # noqa: B018 - load the model and find the space before the first batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = _Rows()
        todo: list[Prepared] = []
        updated = 0
        for display, outcome, stage, reason, payload, row_updated in _each(batch):
            updated += int(row_updated)
            if outcome == DECODED:
                todo.append(pickle.loads(payload))
            else:
                rows.add(display, outcome, stage, reason)
        if todo:
            tick = time.perf_counter()
            outcomes = self._encode_and_store(todo)
            per_image = (time.perf_counter() - tick) / len(todo)
            for prepared, (outcome, stage, reason) in zip(todo, outcomes, strict=True):
                rows.add(prepared.item.display, outcome, stage, reason, decode_seconds=prepared.seconds,
                         encode_seconds=per_image)
        if rows.updated:
            rows.updated[0] = updated  # the batch's updates, carried on one row to the driver
        return rows.columns()

    def _encode_and_store(self, batch: list[Prepared]) -> list[tuple[str, str, str]]:
        """(outcome, stage, reason) per image: stored, skipped (stored already: a retried or duplicate batch), failed."""
        from retrieval.ingest.pipeline import encode_and_write

        service = self.service
        outcome = encode_and_write(service, batch)
        if outcome.failed:
            return [(FAILED, outcome.stage, outcome.reason)] * len(batch)
        new_ids = {stored.image_id for stored in outcome.written}
        ids = {image.sha256: image.id for image in service.store.images_by_sha256([p.sha256 for p in batch])}
        return [(STORED_NOW, "", "") if ids.get(p.sha256) in new_ids else (SKIPPED, "", STORED) for p in batch]


class _Rows:
    """Builds a stage's output batch: one row per file, in the columns every stage shares."""

    def __init__(self) -> None:
        self.display: list[str] = []
        self.outcome: list[str] = []
        self.stage: list[str] = []
        self.reason: list[str] = []
        self.payload: list[bytes] = []
        self.decode_seconds: list[float] = []
        self.encode_seconds: list[float] = []
        self.updated: list[int] = []

    def add(self, display: str, outcome: str, stage: str, reason: str, payload: bytes = b"", *,
            decode_seconds: float = 0.0, encode_seconds: float = 0.0, updated: int = 0) -> None:
        self.display.append(display)
        self.outcome.append(outcome)
        self.stage.append(stage)
        self.reason.append(reason)
        self.payload.append(payload)
        self.decode_seconds.append(decode_seconds)
        self.encode_seconds.append(encode_seconds)
        self.updated.append(updated)

    def columns(self) -> dict[str, Any]:
        return {
            "display": self.display, "outcome": self.outcome, "stage": self.stage, "reason": self.reason,
            "payload": np.array(self.payload, dtype=object), "decode_seconds": self.decode_seconds,
            "encode_seconds": self.encode_seconds, "updated": self.updated,
        }


def _each(batch: dict[str, np.ndarray]) -> Iterator[tuple[str, str, str, str, bytes, int]]:
    """A stage's input rows: (display, outcome, stage, reason, payload, updated)."""
    return zip(batch["display"], batch["outcome"], batch["stage"], batch["reason"], batch["payload"], batch["updated"],
               strict=True)


def ingest_on_ray(service: SpaceService, source: str, *, address: str | None = None,
                  announce: Callable[[str], None] | None = None) -> IngestReport:
    """Ingest every new image under ``source`` on a Ray cluster (``address``; None joins ``RAY_ADDRESS`` or
    starts a local one). ``announce`` gets the Ray dashboard's address.

    ``service`` is the driver's: it lists the source, finds the space and catches its index up at the
    end; the workers build their own from the same settings.
    """
    ray = _import_ray()
    settings = service.settings
    check_ray_settings(settings, source)
    report = IngestReport(run_id=uuid.uuid4().hex[:12], source=printable_path(source))
    items = list(scan(source))
    report.total, report.phase = len(items), "ingesting"
    space = service.space
    report.seconds["load"] = time.perf_counter() - report.started
    if items:  # an empty source starts no cluster
        _join_cluster(ray, address, announce)
    blob = pickle.dumps(settings)
    try:
        for outcome in _run_dataset(ray, items, service, blob, space.id):
            _count(report, outcome)
    finally:
        service.index.catch_up(service.store)
        service.index.save()
        service.store.record_errors(run_id=report.run_id,
                                    failures=[(f.source, f.stage, f.reason) for f in report.failures])
        report.seconds["wall"] = time.perf_counter() - report.started
    logger.info("ingest %s on Ray: %s in %.1fs", report.run_id, report.summary(), report.seconds["wall"])
    return report


def _join_cluster(ray: Any, address: str | None, announce: Callable[[str], None] | None) -> None:
    if ray.is_initialized():
        return
    try:
        context = ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnavailableError(f"could not join or start the Ray cluster {address or '(local)'}: {exc}",
                                      detail={"field": "ray_address"}) from None
    if context.dashboard_url and announce is not None:
        announce(f"Ray dashboard: http://{context.dashboard_url}")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigurationError("--ray needs Ray: pip install 'medvae-retrieval[ray]'") from None
    return ray


def _run_dataset(ray: Any, items: list[SourceItem], service: SpaceService, blob: bytes,
                 space_id: int) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline over ``items``; yields one outcome row per item as batches finish."""
    from retrieval.ingest.pipeline import prepare_options

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # one encoder per GPU (a cluster without GPUs: one CPU encoder, whose torch threads use the node's cores)
    encoder_resources: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    listed = ray.data.from_items([{"display": item.display, "outcome": TODO, "stage": "", "reason": "",
                                   "payload": pickle.dumps(item), "decode_seconds": 0.0, "encode_seconds": 0.0,
                                   "updated": 0} for item in items])
    options = prepare_options(service)
    outcomes = (
        listed.map_batches(fingerprint_and_skip, batch_size=FINGERPRINT_BATCH,
                           fn_kwargs={"settings_blob": blob, "space_id": space_id, "options": options})
        .map_batches(decode, batch_size=DECODE_BATCH, fn_kwargs={"options": options}, memory=DECODE_TASK_MEMORY)
        .map_batches(EncodeAndStore, fn_constructor_args=(blob,), batch_size=service.settings.model.batch_size,
                     compute=ray.data.ActorPoolStrategy(size=max(1, gpus)), **encoder_resources)
        .drop_columns(["payload"])
    )
    yield from outcomes.iter_rows()


def _count(report: IngestReport, row: dict[str, Any]) -> None:
    """Add one file's final outcome to the report (``encode`` seconds include the batch's store transaction)."""
    outcome = row["outcome"]
    report.updated += int(row["updated"])
    report.seconds["decode_cpu"] += float(row["decode_seconds"])
    report.seconds["encode"] += float(row["encode_seconds"])
    if outcome == STORED_NOW:
        report.ingested += 1
    elif outcome == SKIPPED:
        report.skip(row["reason"])
    else:
        report.failures.append(Failure(row["display"], row["stage"] or "decode", row["reason"]))
