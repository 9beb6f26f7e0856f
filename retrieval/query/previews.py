"""Previews: images reconstructed by the MedVAE decoder from stored latents, as PNG bytes.

A preview is a *reconstruction*, not the original pixels; the PNG says so in its text chunks.
:class:`PreviewStore` decodes each at most once per space and keeps it on disk.
"""

from __future__ import annotations

import io
import os
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from retrieval.imaging.volumes import orthogonal_slices
from retrieval.service import SpaceService

_stores: weakref.WeakKeyDictionary[SpaceService, PreviewStore] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()

PREVIEW_NOTE = "MedVAE reconstruction decoded from the stored latent; not the original pixels."
VOLUME_PREVIEW_NOTE = (
    "Middle sagittal, coronal and axial slices of the MedVAE 3-D reconstruction decoded from the stored latent; "
    "not the original voxels."
)


def to_png(pixels: np.ndarray, *, note: str = PREVIEW_NOTE) -> bytes:
    """``(H, W)`` float in [0, 1] -> 8-bit grayscale PNG bytes carrying ``note``."""
    image = Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", note)
    info.add_text("Software", "medvae-retrieval")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def preview_png(service: SpaceService, image_id: int) -> bytes:
    """The decoded image (a volume: its three orthogonal middle slices), from the space's preview store."""
    return previews_for(service).png(image_id)


def previews_for(service: SpaceService) -> PreviewStore:
    """The one :class:`PreviewStore` of ``service`` in this process (one per service, so waits are shared)."""
    with _stores_lock:
        store = _stores.get(service)
        if store is None:
            store = _stores[service] = PreviewStore(service)
        return store


def pixels_to_png(pixels: np.ndarray, spacing: tuple[float, float, float] | None = None) -> bytes:
    """A decoded image (or, for a volume, its three middle slices, in true proportions when its voxel
    ``spacing`` is known) as the preview PNG."""
    if pixels.ndim == 3:
        return to_png(orthogonal_slices(pixels, spacing), note=VOLUME_PREVIEW_NOTE)
    return to_png(pixels)


class PreviewStore:
    """The preview PNGs of one space, each decoded at most once.

    Contract: :meth:`png` returns the cached file (``data/previews/<space key>/<image id>.png``,
    kept across restarts), else waits for a batch already decoding that image, else decodes it.
    :meth:`warm` decodes every uncached image of a list (a page of results) in decoder batches,
    registering them first, so the page's own preview requests wait for that batch instead of
    decoding one by one. Files are written whole (temporary file, then rename). A missing image
    raises :class:`~retrieval.errors.NotFoundError` from ``png``.
    """

    def __init__(self, service: SpaceService) -> None:
        self.service = service
        self.folder = service.settings.storage.data_dir / "previews" / service.space.key
        self._lock = threading.Lock()
        self._in_flight: dict[int, Future[bytes]] = {}

    def path(self, image_id: int) -> Path:
        return self.folder / f"{image_id}.png"

    def png(self, image_id: int) -> bytes:
        for _ in range(3):  # a batch that settles between two looks is looked at again
            cached = self._read(image_id)
            if cached is not None:
                return cached
            claimed = self._claim([image_id])
            if claimed:
                self._decode(claimed)
                return claimed[image_id].result()  # raises what the decode raised (NotFoundError: a 404)
            with self._lock:
                pending = self._in_flight.get(image_id)
            if pending is not None:
                return pending.result()
        raise RuntimeError(f"preview of image {image_id} could not be settled")  # pragma: no cover - defensive

    def warm(self, image_ids: list[int]) -> int:
        """Decode the uncached previews of ``image_ids`` in batches; returns how many were decoded."""
        futures = self._claim([image_id for image_id in image_ids if not self.path(image_id).is_file()])
        self._decode(futures)
        return len(futures)

    def write(self, image_id: int, pixels: np.ndarray) -> None:
        """Store the preview of already decoded pixels (``retrieval ingest --previews``)."""
        self._write(image_id, pixels_to_png(pixels))

    def _read(self, image_id: int) -> bytes | None:
        try:
            return self.path(image_id).read_bytes()
        except FileNotFoundError:
            return None

    def _claim(self, image_ids: list[int]) -> dict[int, Future[bytes]]:
        """Register the ids nobody is decoding yet as ours; returns their futures."""
        claimed: dict[int, Future[bytes]] = {}
        with self._lock:
            for image_id in dict.fromkeys(image_ids):
                if image_id not in self._in_flight:
                    claimed[image_id] = self._in_flight[image_id] = Future()
        return claimed

    def _decode(self, futures: dict[int, Future[bytes]]) -> None:
        latents: dict[int, np.ndarray] = {}
        for image_id, future in futures.items():
            try:
                latents[image_id] = self.service.stored_latent(image_id)
            except Exception as exc:  # noqa: BLE001 - the waiting request gets it (a 404)
                self._settle(image_id, future, error=exc)
        ids = list(latents)
        volumes = self.service.is_volume_space  # decoded one by one: their shapes differ
        spacings = self.service.store.latent_spacings(ids, self.service.space.encoder_key) if volumes else {}
        step = 1 if volumes else max(1, self.service.settings.model.batch_size)
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            try:
                decoded = self.service.encoder.decode(torch.from_numpy(np.stack([latents[i] for i in chunk])))
                for image_id, pixels in zip(chunk, decoded, strict=True):
                    png = pixels_to_png(pixels, spacings.get(image_id))
                    self._write(image_id, png)
                    self._settle(image_id, futures[image_id], result=png)
            except Exception as exc:  # noqa: BLE001 - every waiter of the chunk learns why
                for image_id in chunk:
                    self._settle(image_id, futures[image_id], error=exc)

    def _settle(self, image_id: int, future: Future[bytes], *, result: bytes | None = None,
                error: BaseException | None = None) -> None:
        with self._lock:
            self._in_flight.pop(image_id, None)
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or b"")

    def _write(self, image_id: int, png: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".{image_id}.{os.getpid()}.{threading.get_ident()}.tmp"
        temporary.write_bytes(png)
        os.replace(temporary, self.path(image_id))
