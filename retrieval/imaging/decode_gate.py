"""One large decode at a time, and its memory handed back to the operating system afterwards.

A small file can declare a huge image (a 78 KB PNG declaring 80 Mpx); decoding it takes several
copies of the full frame (Pillow's buffer, the array, float32), about 1 GB at 80 Mpx. Decodes
whose declared size is at least :data:`LARGE_DECODE_VALUES` therefore pass one at a time through
a gate: in the API's threads (a ``threading`` lock) and across an ingest's decode processes (a
``multiprocessing`` lock given to each worker by its initializer). When a large decode ends,
glibc's ``malloc_trim`` returns the freed arenas, so the process does not stay at its peak.
Small images never wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from typing import Any

LARGE_DECODE_VALUES = 16_000_000  # a 4000 x 4000 frame; chest radiographs (~3000 x 3000) stay below

_lock: Any = threading.Lock()


def share_gate(lock: Any) -> None:
    """Use ``lock`` (a ``multiprocessing`` lock shared by a pool's workers) as this process's gate."""
    global _lock  # noqa: PLW0603 - one gate per process, set once by the pool initializer
    _lock = lock


@contextlib.contextmanager
def decoding(declared_values: int) -> Iterator[None]:
    """Hold the gate for a decode of ``declared_values`` values when it is large; trim memory after it."""
    if declared_values < LARGE_DECODE_VALUES:
        yield
        return
    with _lock:
        try:
            yield
        finally:
            release_free_memory()


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
