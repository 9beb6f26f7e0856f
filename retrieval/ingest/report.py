"""What an ingest run reports: counts, per-file failures with their stage, and timings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from retrieval.domain.items import printable_path


@dataclass
class Failure:
    """A file that failed; ``source`` is stored and shown, so it is made printable here, once."""

    source: str
    stage: str
    reason: str

    def __post_init__(self) -> None:
        self.source = printable_path(self.source)


_COUNTING = threading.Lock()  # the pipeline's stages count skips from two threads

STORED = "already stored in this space"
SAME_CONTENT = "same bytes as another file of this run"
SAME_SOP_UID = "same SOPInstanceUID as another file (a copy of one DICOM instance)"


@dataclass
class IngestReport:
    run_id: str
    source: str = ""
    phase: str = "scanning"  # then "ingesting"
    total: int = 0
    ingested: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    updated: int = 0  # skipped (stored) images whose metadata a manifest changed, without re-encoding
    failures: list[Failure] = field(default_factory=list)
    stopped: bool = False  # should_stop ended the run before every item was seen
    dropped_columns: list[str] = field(default_factory=list)  # manifest columns not stored (names only)
    device_frames: int = 0  # images mapped and fitted on the encoder's device (RETRIEVAL_INGEST_FIT_DEVICE)
    shared_frames: int = 0  # of those, handed over by a decode worker in shared memory, not pickled
    codec_frames: int = 0  # of those, decoded from compressed DICOM on the device (RETRIEVAL_INGEST_FRAME_DECODER)
    codec_fallbacks: int = 0  # compressed frames the device's codec refused, decoded on the CPU instead
    seconds: dict[str, float] = field(
        default_factory=lambda: {"decode_cpu": 0.0, "encode": 0.0, "write": 0.0, "wall": 0.0}
    )
    started: float = field(default_factory=time.perf_counter)

    def skip(self, reason: str) -> None:
        """Count one skipped item under ``reason`` (:data:`STORED`, :data:`SAME_CONTENT`, :data:`SAME_SOP_UID`)."""
        with _COUNTING:
            self.skipped += 1
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

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

    def summary(self, *, ingested: int | None = None, skipped: int | None = None,
                skip_reasons: dict[str, int] | None = None) -> str:
        """One line: the counts (a job passes its totals over all attempts), why things were skipped,
        and any manifest columns not stored."""
        ingested = self.ingested if ingested is None else ingested
        skipped = self.skipped if skipped is None else skipped
        reasons = self.skip_reasons if skip_reasons is None else skip_reasons
        line = f"ingested {ingested}, skipped {skipped}, failed {self.failed}"
        if self.total == 0 and not self.failures:
            line += f"; no images found under {self.source or 'the source'}"
        if reasons:
            line += "; skipped: " + ", ".join(f"{count} {reason}" for reason, count in reasons.items())
        if self.updated:
            line += f", updated {self.updated} (manifest metadata on stored images)"
        if self.dropped_columns:
            line += f"; manifest columns not stored: {', '.join(self.dropped_columns)} (RETRIEVAL_MANIFEST_COLUMNS keeps one)"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "total": self.total,
            "ingested": self.ingested,
            "skipped": self.skipped,
            "skip_reasons": self.skip_reasons,
            "updated": self.updated,
            "failed": self.failed,
            "stopped": self.stopped,
            "images_per_second": round(self.images_per_second, 3),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "failures": [f.__dict__ for f in self.failures],
            "dropped_manifest_columns": self.dropped_columns,
            "device_fit": {"frames": self.device_frames, "shared_memory": self.shared_frames,
                           "device_decoded": self.codec_frames, "device_decode_fallbacks": self.codec_fallbacks},
        }


ProgressCallback = Callable[[IngestReport], None]
