"""A pipeline stage on its own thread, fed through a bounded queue: how ingest overlaps its steps.

The local pipeline runs fingerprinting and skip checks, decoding (worker processes), fitting, encoding and
writing at once rather than one after another (decision 36): while the encoder works on batch N, the
database stores batch N-1 and the decode workers read batch N+1. Each stage is a :class:`Stage`: a thread
applying one function to the items of its inbox in order. The inbox is bounded, so a slow stage holds
back the ones before it instead of letting decoded images pile up in memory.

Contract:

* :meth:`Stage.put` blocks while the inbox is full. If the stage's function has raised, ``put`` raises that
  same error instead (its type kept, so a :class:`~retrieval.errors.RetrievalError` still reaches the CLI's
  and the API's error handling; a note names the stage); the stage drops what is still queued (a failing
  stage never blocks its feeders).
* :meth:`Stage.close` lets the queued items run, ends the thread and raises the function's error if it
  raised; closing twice is harmless. :func:`abandon` ends stages without running what is still
  queued (after an error or an interrupt: each finishes the item in hand and drops the rest).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")

_END = object()
_NOTE = "(in the ingest stage"


class Stage(Generic[Item]):
    """A thread that applies ``work`` to each item put into it, in order."""

    def __init__(self, name: str, work: Callable[[Item], Any], *, depth: int = 2) -> None:
        self.name = name
        self._work = work
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Item) -> None:
        """Queue ``item`` (waiting while the inbox is full)."""
        self._raise_if_failed()
        self._inbox.put(item)

    def close(self) -> None:
        """Run what is queued, end the thread; raise if the stage failed."""
        if self._thread.is_alive():
            self._inbox.put(_END)
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._inbox.get()) is not _END:
            if self._error is not None or self._dropping:
                continue  # failed or abandoned: drain, so that no feeder waits on a full inbox
            try:
                self._work(item)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever puts or closes next
                logger.debug("ingest stage %s failed", self.name, exc_info=True)
                if not any(note.startswith(_NOTE) for note in getattr(exc, "__notes__", [])):  # the stage it began in
                    exc.add_note(f"{_NOTE} {self.name!r})")
                self._error = exc


def abandon(*stages: Stage[Any]) -> None:
    """End ``stages`` once each has finished the item in hand, dropping what they hold; never raises. All stop
    taking work first, so none waits on a full inbox of another that would still be working through its own."""
    for stage in stages:
        stage._dropping = True  # noqa: SLF001 - the module's own function
    for stage in stages:
        if stage._thread.is_alive():  # noqa: SLF001
            stage._inbox.put(_END)  # noqa: SLF001
            stage._thread.join()  # noqa: SLF001
