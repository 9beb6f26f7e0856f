"""Shared-memory slots that carry decoded frames from the decode processes to the pipeline without pickling.

When ingest fits images on the encoder's device (decision 36), a decode worker hands over a whole frame of
stored values (8 MB for a 2048² 16-bit image), not a 384² model input. Pickled through the pool's pipe,
that costs the pipeline's process 3.5-5.8 ms of CPU per frame (measured on this workplace's 2-core
machine) and copies it twice more; at 300 frames a second that is more than a core. Instead the workers
write each frame into one of a fixed set of slots of one shared-memory block, and the pipeline copies it
from there straight into a pinned buffer for the device and frees the slot.

Contract:

* The pipeline's process creates :class:`FrameSlots` (``count`` slots of ``slot_bytes``) before its pool,
  passes :meth:`FrameSlots.handle` to each worker's initializer, and :meth:`FrameSlots.close` unlinks the
  block when the run ends (the workers end with the pipeline, :mod:`retrieval.ingest.lifeline`).
* A worker's :func:`offer` never waits: with no free slot, or a frame larger than a slot, it returns None
  and the frame travels inline (pickled) instead. So results consumed in order can never deadlock on slots.
* A slot's frame is valid until the pipeline :meth:`~FrameSlots.release`\\ s it, once copied out.
* A SIGKILLed pipeline leaves no block behind: its workers end with it (:mod:`retrieval.ingest.lifeline`), and
  multiprocessing's resource tracker then unlinks the block it registered (checked by hand, 2026-11-30). Only
  killing the tracker too (a whole process group) leaves it in ``/dev/shm``.
* Slots are sized to what ``/dev/shm`` can hold: a container's small default (64 MB) gets fewer slots, or
  none, rather than a SIGBUS when a page of an over-committed block is touched.
"""

from __future__ import annotations

import logging
import os
import queue
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SLOT_BYTES = 16 << 20
"""One slot: a 2048 x 4096 16-bit frame (8 MB for 2048²); larger frames travel inline."""
SHM_SHARE = 0.5
"""The share of ``/dev/shm``'s free space the slots may take."""


@dataclass(frozen=True)
class SlotRef:
    """Where a worker left a frame: slot ``index``, holding an array of ``shape`` and ``dtype``."""

    index: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class SlotsHandle:
    """What a worker needs to attach (picklable): the block's name, the slot size and the free-slot queue."""

    name: str
    slot_bytes: int
    count: int
    free: Any  # a multiprocessing queue of free slot indices


class FrameSlots:
    """The pipeline's side: owns the block and the free-slot queue."""

    def __init__(self, context: Any, *, count: int, slot_bytes: int = SLOT_BYTES) -> None:
        self.count, self.slot_bytes = count, slot_bytes
        self._memory = shared_memory.SharedMemory(create=True, size=count * slot_bytes)
        self._free = context.Queue()
        for index in range(count):
            self._free.put(index)

    @classmethod
    def sized_for(cls, context: Any, *, wanted: int, slot_bytes: int = SLOT_BYTES) -> FrameSlots | None:
        """Up to ``wanted`` slots, as many as :data:`SHM_SHARE` of ``/dev/shm``'s free space holds; None when
        that is under two (frames then travel inline) or shared memory cannot be made."""
        count = min(wanted, int(_shm_free_bytes() * SHM_SHARE) // slot_bytes)
        if count < 2:
            logger.warning("shared memory too small for frame slots; decoded frames travel pickled (slower)")
            return None
        try:
            return cls(context, count=count, slot_bytes=slot_bytes)
        except OSError as exc:
            logger.warning("cannot create frame slots (%s); decoded frames travel pickled (slower)", exc)
            return None

    def handle(self) -> SlotsHandle:
        return SlotsHandle(name=self._memory.name, slot_bytes=self.slot_bytes, count=self.count, free=self._free)

    def view(self, ref: SlotRef) -> np.ndarray:
        """The frame in slot ``ref`` (valid until released)."""
        return _slot_array(self._memory, self.slot_bytes, ref)

    def release(self, ref: SlotRef) -> None:
        self._free.put(ref.index)

    def close(self) -> None:
        self._free.close()
        self._free.join_thread()
        self._memory.close()
        self._memory.unlink()


def _shm_free_bytes() -> int:
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (macOS): POSIX shared memory is not backed by a sized tmpfs there
        return 1 << 30
    return stats.f_bavail * stats.f_frsize


def _slot_array(memory: shared_memory.SharedMemory, slot_bytes: int, ref: SlotRef) -> np.ndarray:
    return np.ndarray(ref.shape, dtype=np.dtype(ref.dtype), buffer=memory.buf, offset=ref.index * slot_bytes)


# --------------------------------------------------------------------------- worker side

_attached: tuple[shared_memory.SharedMemory, SlotsHandle] | None = None


def attach(handle: SlotsHandle | None) -> None:
    """In a decode worker (its pool initializer): use the pipeline's slots, or none."""
    global _attached  # noqa: PLW0603 - one set of slots per worker process, set once by the initializer
    _attached = (shared_memory.SharedMemory(name=handle.name), handle) if handle is not None else None


def offer(values: np.ndarray) -> SlotRef | None:
    """Copy ``values`` into a free slot and say which; None (send it inline) when this process has no slots, the
    frame is larger than a slot, or every slot is taken."""
    if _attached is None:
        return None
    memory, handle = _attached
    if values.nbytes > handle.slot_bytes:
        return None
    try:
        index = handle.free.get_nowait()
    except queue.Empty:
        return None
    ref = SlotRef(index=index, shape=tuple(values.shape), dtype=values.dtype.str)
    _slot_array(memory, handle.slot_bytes, ref)[...] = values
    return ref
