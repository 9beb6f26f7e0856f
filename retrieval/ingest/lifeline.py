"""Decode workers end with the process that started them, even when it is SIGKILLed.

A pool worker started through the forkserver holds the write ends of the forkserver's and the
resource tracker's "alive" pipes, and waits on a call queue whose both ends it holds itself: if the
ingest process dies without a word, nothing would ever wake it, and it would keep the forkserver
and the resource tracker alive too. :func:`exit_with` (the pool's initializer) starts a daemon
thread that waits for the owning process to end and then ends the worker; the forkserver and the
tracker follow once the pipes close.
"""

from __future__ import annotations

import os
import select
import threading
import time

POLL_SECONDS = 1.0


def exit_with(owner_pid: int) -> None:
    """Pool initializer: end this worker process as soon as ``owner_pid`` has exited."""
    threading.Thread(target=_watch, args=(owner_pid,), daemon=True, name="lifeline").start()


def _watch(owner_pid: int) -> None:
    try:
        handle = os.pidfd_open(owner_pid)  # Linux: readable once the process exits; no PID reuse race
    except (AttributeError, OSError):  # another OS, or the owner is already gone
        while _alive(owner_pid):
            time.sleep(POLL_SECONDS)
    else:
        select.select([handle], [], [])
    os._exit(1)  # noqa: SLF001 - no clean-up may wait on a parent that is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
