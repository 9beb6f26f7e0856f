"""Micro-batching of concurrent query encodes: one encoder call serves every query that arrives
within a short window (a GPU encodes 16 images in about the time of 2).

Contract: :meth:`MicroBatcher.submit` blocks its caller until that image's result is ready and
returns exactly what ``encode_batch`` returned for its row; an exception in the batch call is
raised in every caller of that batch. One daemon thread runs the batches in arrival order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

BatchFn = Callable[[np.ndarray], tuple[Any, np.ndarray]]


class MicroBatcher:
    """Coalesce single-image requests into batches of at most ``max_batch``."""

    def __init__(self, encode_batch: BatchFn, *, max_batch: int, wait_seconds: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.encode_batch = encode_batch
        self.max_batch = max(1, max_batch)
        self.wait_seconds = wait_seconds
        self.on_batch = on_batch
        self._queue: queue.Queue[tuple[np.ndarray, Future[tuple[Any, np.ndarray]]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="query-batcher")
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> tuple[Any, np.ndarray]:
        """Encode one ``(S, S)`` image; returns its ``(z, vector)`` row."""
        future: Future[tuple[Any, np.ndarray]] = Future()
        self._queue.put((pixels, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self, first: tuple[np.ndarray, Future[Any]]) -> list[tuple[np.ndarray, Future[Any]]]:
        items = [first]
        deadline = time.monotonic() + self.wait_seconds
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # seen again by the loop, after this batch
                break
            items.append(item)
        return items

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = self._collect(first)
            try:
                z, vectors = self.encode_batch(stacked([pixels for pixels, _ in items]))
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future in items:
                    future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(items))
            for row, (_, future) in enumerate(items):
                future.set_result((z[row], vectors[row]))


def stacked(images: list[Any]) -> Any:
    """One batch of images: arrays stacked by numpy; when any is a tensor (fitted on the encoder's device), all of
    them by torch, on that tensor's device (an ingest batch mixes frames fitted there with ones its workers fitted)."""
    tensors = [image for image in images if isinstance(image, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        return torch.stack([torch.as_tensor(image, device=device) for image in images])
    return np.stack(images)
