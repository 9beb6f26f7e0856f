"""CPU stages of ingest, run in worker processes: fingerprint a file, then decode and fit it.

Kept free of torch so worker processes start fast. Every function returns a result object and
never raises for a bad file: the failure (stage + reason) travels back to the pipeline, which
records it and carries on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.domain.items import SourceItem
from retrieval.domain.metadata import ImageMetadata, from_dicom, merge_manifest_row
from retrieval.domain.spaces import PreprocessSpec
from retrieval.errors import RetrievalError
from retrieval.imaging.decode import (
    DICOM_SUFFIXES,
    IN_UNIT,
    EncodedFrame,
    UnitMap,
    decode_path,
    looks_like_dicom,
)
from retrieval.imaging.decode_gate import share_gate
from retrieval.imaging.preprocess import to_model_input
from retrieval.ingest import frame_slots
from retrieval.ingest.frame_slots import SlotRef, SlotsHandle
from retrieval.ingest.lifeline import exit_with


@dataclass
class Fingerprint:
    item: SourceItem
    sha256: str = ""
    sop_uid: str | None = None
    error: str | None = None


@dataclass
class Prepared:
    """A decoded image ready for the encoder, or the reason it is not.

    Fitted in the worker, ``pixels`` is the model input. Left to the device (``fit_on_device``, a frame whose
    ``unit`` is not :data:`IN_UNIT`), ``pixels`` is None and the frame's stored values are in ``frame`` or in
    the shared-memory slot ``frame_slot``, or still compressed in ``encoded`` (``device_codec_syntaxes``), until the
    pipeline decodes and fits them (:mod:`retrieval.imaging.device_codec`, :mod:`retrieval.imaging.device_fit`)
    and sets ``pixels`` to the fitted tensor.
    """

    item: SourceItem
    sha256: str
    pixels: Any = field(default=None, repr=False)  # (S, S) float32 in [0, 1]: an array, or a tensor on the device
    frame: np.ndarray | None = field(default=None, repr=False)
    frame_slot: SlotRef | None = None
    encoded: EncodedFrame | None = field(default=None, repr=False)
    unit: UnitMap = IN_UNIT
    kind: str = ""
    width: int = 0
    height: int = 0
    frames: int = 1
    metadata: ImageMetadata = field(default_factory=ImageMetadata)
    study_key: str = ""
    study_label: str = ""
    error: str | None = None
    seconds: float = 0.0  # CPU-side decode + fit time in the worker


@dataclass(frozen=True)
class PrepareOptions:
    preprocessing: PreprocessSpec
    max_pixels: int
    id_secret: str
    date_shift_days: int = 0
    manifest_columns: frozenset[str] = frozenset()  # extra manifest columns the user chose to store
    fit_on_device: bool = False  # leave mapping and fitting a 2-D stretch frame to the pipeline's device
    device_codec_syntaxes: frozenset[str] = frozenset()  # with fit_on_device: pass these DICOM frames on compressed


def manifest_metadata(row: dict[str, str], options: PrepareOptions) -> ImageMetadata:
    """What a manifest row says of an image already stored (applied without re-encoding it)."""
    return merge_manifest_row(ImageMetadata(), row, secret=options.id_secret, keep=options.manifest_columns)


def start_decode_worker(owner_pid: int, large_decode_lock: Any, slots: SlotsHandle | None = None) -> None:
    """Pool initializer: end with the process that owns the pool, share its one-large-decode-at-a-time gate, and
    hand frames over in its shared-memory ``slots`` when it has them."""
    exit_with(owner_pid)
    share_gate(large_decode_lock)
    frame_slots.attach(slots)


def fingerprint(item: SourceItem) -> Fingerprint:
    """sha256 of the file's bytes, and the SOPInstanceUID when the file is DICOM."""
    if item.error:
        return Fingerprint(item=item, error=item.error)
    path = Path(item.path)
    try:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            head = handle.read(1 << 20)
            digest.update(head)
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        return Fingerprint(item=item, error=f"cannot read file ({exc.strerror or exc})")
    if not head:  # never an image; and every empty file would otherwise be a "duplicate" of the first
        return Fingerprint(item=item, error="file is empty")
    sop_uid = None
    if looks_like_dicom(head[:132]) or path.suffix.lower() in DICOM_SUFFIXES:
        sop_uid = _read_sop_uid(path)
    return Fingerprint(item=item, sha256=digest.hexdigest(), sop_uid=sop_uid)


def _read_sop_uid(path: Path) -> str | None:
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
        value = header.get("SOPInstanceUID")
        return str(value).strip() or None if value else None
    except Exception:  # a broken header is reported by the decode stage
        return None


def prepare(task: tuple[Fingerprint, PrepareOptions]) -> Prepared:
    """Decode, read metadata, fit to the space's model input. Never raises for a bad file."""
    fp, options = task
    item = fp.item
    started = time.perf_counter()
    try:
        decoded = decode_path(item.path, max_pixels=options.max_pixels, keep_stored_values=options.fit_on_device,
                              pass_encoded=options.device_codec_syntaxes)
        metadata = (
            from_dicom(decoded.dicom, secret=options.id_secret, date_shift_days=options.date_shift_days) if decoded.dicom is not None else ImageMetadata()
        )
        if item.row:
            metadata = merge_manifest_row(metadata, item.row, secret=options.id_secret, keep=options.manifest_columns)
        if decoded.unit.kind == "unit":
            pixels, frame, slot = to_model_input(decoded, options.preprocessing), None, None
        elif decoded.encoded is not None:  # the device's codec decodes it
            pixels, frame, slot = None, None, None
        else:  # the device maps and fits it: hand over the stored values, in shared memory where a slot is free
            pixels, slot = None, frame_slots.offer(decoded.pixels)
            frame = decoded.pixels if slot is None else None
    except RetrievalError as exc:  # the failure already names the source: keep the reason alone
        return Prepared(item=item, sha256=fp.sha256, error=exc.message.removeprefix(f"{item.path}: "))
    except MemoryError:
        return Prepared(item=item, sha256=fp.sha256, error="out of memory while decoding")
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop a bulk ingest
        return Prepared(item=item, sha256=fp.sha256, error=f"unexpected {type(exc).__name__}: {exc}")
    study_key, study_label = study_of(item, metadata)
    return Prepared(
        item=item,
        sha256=fp.sha256,
        pixels=pixels,
        frame=frame,
        frame_slot=slot,
        encoded=decoded.encoded,
        unit=decoded.unit,
        kind=decoded.kind,
        width=decoded.width,
        height=decoded.height,
        frames=decoded.frames,
        metadata=metadata,
        study_key=study_key,
        study_label=study_label,
        seconds=time.perf_counter() - started,
    )


def study_of(item: SourceItem, metadata: ImageMetadata) -> tuple[str, str]:
    """``(study key, display label)``: StudyInstanceUID, else manifest ``study``, else parent folder."""
    if metadata.study_uid:
        return f"dicom:{metadata.study_uid}", metadata.study_uid
    if item.study:
        return f"manifest:{item.study}", item.study
    parent = Path(item.path).resolve().parent
    return f"folder:{parent}", parent.name or str(parent)
