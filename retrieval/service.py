"""SpaceService: one embedding space's preprocessing, encoder, pooling head and index over the shared store.

It is the one object that knows how this space turns pixels into a vector, and the one place
that tells 2-D from 3-D: ingest, search, similarity maps, ``/score``, quality and evaluation all
call :meth:`SpaceService.model_input` / :meth:`SpaceService.embed` instead of preprocessing on
their own. The CLI and the API build one per request scope; :class:`SpaceServices` serves the
other stored spaces of the same database beside it.

The encoder and the index are loaded lazily on first use, under a lock (loading MedVAE takes
seconds; ``doctor`` and metadata reads do not need it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from retrieval.config import Settings
from retrieval.domain.spaces import PreprocessSpec, SpaceIdentity
from retrieval.domain.whitening import VectorTransform
from retrieval.errors import (
    ConfigurationError,
    ConflictError,
    NotFoundError,
    UnsupportedQueryError,
)
from retrieval.imaging import device_fit
from retrieval.imaging.decode import DecodedImage
from retrieval.imaging.device_codec import DeviceFrameCodec, open_device_codec
from retrieval.imaging.preprocess import (
    PREPROCESSING_VERSIONS,
    FittedVolume,
    fit_volume,
    preprocess_spec,
    to_model_input,
)
from retrieval.imaging.volumes import Volume
from retrieval.model.batching import MicroBatcher
from retrieval.model.biomedclip import BiomedClip, clip_source, load_clip
from retrieval.model.contract import Encoder
from retrieval.model.loader import load_encoder
from retrieval.model.pooling import CLIP_HEAD, PoolingSpec, parse_pooling, pool
from retrieval.model.weights import weights_warning
from retrieval.storage.index import OpenReport, SpaceIndex
from retrieval.storage.index_spec import choose_index_spec
from retrieval.storage.orm import Space
from retrieval.storage.store import Store
from retrieval.storage.transforms import load_transform

logger = logging.getLogger(__name__)

VOLUME_COMPARE_GRID = 16
"""Cells per axis that volumes' latents are averaged onto for whole-latent comparisons (their shapes differ)."""


class SpaceService:
    """One embedding space of an archive: preprocessing, encoder, pooling head and index, over its store."""

    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.pooling: PoolingSpec = parse_pooling(settings.model.pooling)
        #: more heads an ingest fills from the same encode (``extra_poolings``): the encoder runs once
        self.extra_poolings: list[PoolingSpec] = [parse_pooling(text) for text in settings.model.extra_pooling_list]
        self.preprocessing: PreprocessSpec = preprocess_spec(settings.model.dims, settings.model.space_input_size,
                                                             settings.model.fit)
        self.store = store or Store.open(settings)
        self._encoder: Encoder | None = None
        self._space: Space | None = None
        self._index: SpaceIndex | None = None
        self.index_report: OpenReport | None = None
        self._lock = threading.RLock()
        self._batcher: MicroBatcher | None = None
        self._transforms: dict[str, VectorTransform] = {}
        self._extra_spaces: list[tuple[Space, PoolingSpec]] | None = None
        self._codecs: dict[tuple[str, str], DeviceFrameCodec | None] = {}  # (fit_device, frame_decoder) -> codec
        if self.is_volume_space and any(spec.is_model_head for spec in (self.pooling, *self.extra_poolings)):
            raise ConfigurationError(f"pooling {CLIP_HEAD}: BiomedCLIP's head is trained on 2-D stage-2 latents; "
                                     f"{settings.model.name} is a 3-D model", detail={"field": "pooling"})
        #: optional ``(name, value)`` hook for timings (the API feeds Prometheus with it)
        self.observe: Callable[[str, float], None] = lambda _name, _value: None

    # -- lazily loaded parts

    @property
    def encoder(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = load_encoder(self.settings)
            return self._encoder

    @property
    def clip(self) -> BiomedClip:
        """BiomedCLIP (the ``biomedclip`` head and the text tower), loaded on first use, shared in the process."""
        return load_clip(self.settings.clip, self.encoder.device)

    @property
    def has_text_tower(self) -> bool:
        """True when this space's vectors live in BiomedCLIP's image-text space (text queries work)."""
        return self.pooling.is_model_head

    @property
    def is_volume_space(self) -> bool:
        """True for 3-D spaces (one vector per volume), False for 2-D images."""
        return self.preprocessing.dims == 3

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    def identity(self, pooling: PoolingSpec | None = None) -> SpaceIdentity:
        """The identity of the configured space (or of the same encoder with another pooling)."""
        spec = pooling or self.pooling
        encoder = self.encoder
        if spec.is_model_head:
            clip_identity = clip_source(self.settings.clip).identity  # the weights' identity; the model stays unbuilt
            if spec.head_weights not in (None, clip_identity):
                raise ConflictError(
                    f"pooling {spec.canonical}: that space was made with BiomedCLIP weights {spec.head_weights}; these "
                    f"RETRIEVAL_CLIP_* settings give {clip_identity}, so they cannot encode queries for it",
                    detail={"field": "pooling"})
            spec = spec.with_head_weights(clip_identity)
        return SpaceIdentity(
            model=self.settings.model.name,
            weights=encoder.weights.identity,
            input_size=self.preprocessing.input_size,
            preprocessing=self.preprocessing.version,
            pooling=spec.canonical,
            dim=spec.dimension(encoder.latent_channels, encoder.dims),
        )

    @property
    def space(self) -> Space:
        with self._lock:
            if self._space is None:
                self._space = self.store.ensure_space(self.identity())
            return self._space

    @property
    def index(self) -> SpaceIndex:
        with self._lock:
            if self._index is None:
                count, _ = self.store.vector_stats(self.space.id)
                self._index, self.index_report = SpaceIndex.open(
                    store=self.store,
                    space=self.space,
                    directory=self.settings.storage.index_dir,
                    spec=choose_index_spec(count, self.settings, self.space.dim),
                )
                logger.info("index %s: %s %s", self.space.key[:12], self.index_report.action, self.index_report.reason)
            return self._index

    def searchable_index(self) -> SpaceIndex:
        """The index with every vector committed so far (by workers or other processes) added."""
        index = self.index
        index.catch_up(self.store)
        return index

    # -- embedding

    def model_input(self, decoded: DecodedImage | Volume) -> np.ndarray:
        """A decoded image (2-D space) or loaded volume (3-D space) as this space's encoder takes it."""
        return to_model_input(decoded, self.preprocessing)

    def fit_volume(self, volume: Volume) -> FittedVolume:
        """A loaded volume as this 3-D space's encoder takes it, with the spacing it is encoded at."""
        if not self.is_volume_space:
            raise TypeError("fit_volume: this space encodes 2-D images")
        return fit_volume(volume, max_voxels=self.preprocessing.input_size)

    def embed(self, decoded: DecodedImage | Volume) -> tuple[torch.Tensor, np.ndarray]:
        """One decoded query image or volume -> (z, vector) of this space (micro-batched when on)."""
        return self.embed_query(self.query_input(decoded))

    def query_input(self, decoded: DecodedImage | Volume) -> np.ndarray | torch.Tensor:
        """:meth:`model_input` for a query: mapped from its stored values (``decoded.unit``) and fitted on the encoder's
        device where ``query.fit_device`` says so (2-D images stretched to the square: :mod:`retrieval.imaging.device_fit`),
        else on the CPU."""
        if isinstance(decoded, DecodedImage) and self.fits_on_device(self.settings.query.fit_device):
            return device_fit.fit_frame(decoded.pixels, decoded.unit, self.preprocessing.input_size, self.encoder.device)
        return self.model_input(decoded)

    @property
    def query_codec(self) -> DeviceFrameCodec | None:
        """:meth:`frame_codec` for queries (``query.fit_device``, ``query.frame_decoder``)."""
        return self.frame_codec(self.settings.query.fit_device, self.settings.query.frame_decoder)

    def frame_codec(self, fit_device: str, frame_decoder: str) -> DeviceFrameCodec | None:
        """The codec that decodes compressed DICOM frames on the encoder's device for a ``fit_device`` and a
        ``frame_decoder`` setting (:mod:`retrieval.imaging.device_codec`), opened once per service (every ingest
        run, job and query of a server or worker shares it); None where frames are not fitted there or the setting
        resolves to the CPU. A required codec that cannot start raises its ConfigurationError at every call."""
        with self._lock:
            key = (fit_device, frame_decoder)
            if key not in self._codecs:
                on_device = self.fits_on_device(fit_device)
                self._codecs[key] = open_device_codec(frame_decoder, self.encoder.device) if on_device else None
            return self._codecs[key]

    def fits_on_device(self, choice: str) -> bool:
        """Whether 2-D images are fitted on the encoder's device for a ``fit_device`` setting (``query.fit_device``,
        ``ingest.fit_device``): ``encoder``, or ``auto`` on a GPU. Only the stretch fit has a device twin
        (:mod:`retrieval.imaging.device_fit`): volumes and letterboxed spaces are fitted on the CPU whatever it says."""
        if choice == "cpu" or self.is_volume_space or self.preprocessing.version != PREPROCESSING_VERSIONS["stretch"]:
            return False
        return choice == "encoder" or self.encoder.device.type == "cuda"

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """``(B, S, S)`` normalised pixels -> (z ``(B, C, h, w)``, vectors ``(B, D)`` float32)."""
        z, _head, vectors = self.encode_for_storage(pixels)
        return z, vectors

    def encode_for_storage(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """``(B, S, S)`` normalised pixels (volumes: ``(B, X, Y, Z)``) -> (z, the stage-2 latent stored beside it
        for re-ranking (None for volumes, whose pooled latent is z itself), vectors ``(B, D)`` float32)."""
        tick = time.perf_counter()
        z = self.encoder.encode(pixels)
        head = self.head_latent(z)
        vectors = self._vectorise(head, self.pooling)
        self.observe("encode_seconds", time.perf_counter() - tick)
        return z, None if self.is_volume_space else head, vectors

    @property
    def extra_spaces(self) -> list[tuple[Space, PoolingSpec]]:
        """The spaces of ``extra_poolings`` (same encoder, other heads), created on first use."""
        with self._lock:
            if self._extra_spaces is None:
                self._extra_spaces = [(self.store.ensure_space(self.identity(spec)), spec) for spec in self.extra_poolings]
            return self._extra_spaces

    def fan_out(self, head: torch.Tensor) -> list[tuple[Space, np.ndarray]]:
        """The vectors of every extra space for a batch's pooled latents (one encode, several heads)."""
        return [(space, self._vectorise(head, spec)) for space, spec in self.extra_spaces]

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Texts -> ``(N, 512)`` vectors of this space (BiomedCLIP's text tower, then the space's transform if any);
        an :class:`UnsupportedQueryError` (422) naming the spaces with a text tower when this space has none."""
        if not self.has_text_tower:
            with_text = [f"{space.key[:12]} ({space.pooling})" for space in self.store.list_spaces()
                         if parse_pooling(space.pooling).is_model_head]
            raise UnsupportedQueryError(
                f"text queries need a space with a text tower (pooling {CLIP_HEAD}); this space's pooling is "
                f"{self.pooling.canonical}. " + (f"Spaces with one: {', '.join(with_text)}" if with_text else
                f"This archive has none: `retrieval reindex --to-pooling {CLIP_HEAD}` builds one from stored z"),
                detail={"field": "text", "spaces": [text.split()[0] for text in with_text]})
        vectors = self.clip.embed_texts(texts)
        return vectors if self.pooling.transform_key is None else self._transform(self.pooling).apply(vectors)

    def placeholder_warnings(self) -> list[str]:
        """What every output of this space says about weights that are not the trained ones (random, fake,
        a generated vocabulary); empty for the real weights."""
        warning = weights_warning(self.settings.model.weights)
        clip = self.clip.source.warnings() if self.has_text_tower else []
        return ([warning] if warning else []) + clip

    def head_latent(self, z: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
        """The latent this space pools: MedVAE's stage-2 latent for images; z itself for volumes, as
        medvae's own 3-D ``encode`` returns (its 3-D stage-2 head is never trained). ``fast``: bf16 where
        the encoder runs bf16 (re-ranking; never for stored vectors)."""
        return z.float() if self.is_volume_space else self.encoder.s2_latent(z, fast=fast)

    def vectors_of(self, z: torch.Tensor) -> np.ndarray:
        """``(B, C, ...)`` stored latents z -> this space's ``(B, D)`` float32 vectors."""
        return self._vectorise(self.head_latent(z), self.pooling)

    def _vectorise(self, head: torch.Tensor, spec: PoolingSpec) -> np.ndarray:
        """Pooled latents -> vectors of ``spec``: pooled (or BiomedCLIP's head), then the archive-fitted transform
        it names, if any."""
        vectors = self.clip.embed_latents(head) if spec.is_model_head else pool(head, spec).numpy()
        return vectors if spec.transform_key is None else self._transform(spec).apply(vectors)

    def _transform(self, spec: PoolingSpec) -> VectorTransform:
        key = spec.transform_key
        assert key is not None
        with self._lock:
            found = self._transforms.get(key)
            if found is None:
                found = load_transform(self.store, key)
                if found is None:
                    raise ConfigurationError(
                        f"pooling {spec.canonical}: this database has no fitted transform {key} "
                        "(`retrieval reindex --transform whiten` fits one on a space's vectors)",
                        detail={"field": "pooling"})
                self._transforms[key] = found
            return found

    def pooled(self, latents: Sequence[np.ndarray], pooling: PoolingSpec | None = None) -> np.ndarray:
        """Stored latents of any shapes (volumes differ) -> ``(N, D)`` float32 vectors with ``pooling``
        (default: the space's), in order; latents of one shape are pooled as one batch."""
        spec = pooling or self.pooling
        out = np.empty((len(latents), spec.dimension(self.encoder.latent_channels, self.encoder.dims)), np.float32)
        for indices, batch in _by_shape(latents):
            out[indices] = self._vectorise(self.head_latent(batch), spec)
        return out

    def whole_latents(self, latents: Sequence[np.ndarray | torch.Tensor], *, heads: bool = False) -> torch.Tensor:
        """``(N, K)`` rows for whole-latent comparisons (re-ranking, evaluation), flattened: an image's stage-2
        grid as it is (one shape per 2-D space); a volume's z average-pooled onto :data:`VOLUME_COMPARE_GRID`
        cells per axis, since volumes differ in shape. ``heads``: the latents given are already the pooled
        latents (stored stage-2 latents), so the head is not run again."""
        rows: list[torch.Tensor] = [torch.empty(0)] * len(latents)
        for indices, batch in _by_shape(latents):
            head = batch if heads else self.head_latent(batch)
            if self.is_volume_space:
                head = torch.nn.functional.adaptive_avg_pool3d(head, VOLUME_COMPARE_GRID)
            for position, row in zip(indices, head.flatten(1), strict=True):
                rows[position] = row
        return torch.stack(rows)

    def stored_whole_latents(self, image_ids: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """Whole-latent rows (:meth:`whole_latents`) of stored images, in the order given: from the stage-2
        latents ingest stored beside z where it did (one SQL read, no model), else from z through the head
        (rows stored before 2026-11-30; bf16 where the encoder runs bf16). A volume's pooled latent is its
        z. Ids without a latent in this space are dropped; returns the ids kept and their rows."""
        key = self.space.encoder_key
        if self.is_volume_space:
            heads: dict[int, Any] = self.store.latents_of(image_ids, key)
        else:
            heads = self.store.heads_of(image_ids, key)
            older = self.store.latents_of([i for i in image_ids if i not in heads], key)
            if older:  # one 2-D space, one latent shape: one batch through the head
                computed = self.head_latent(torch.from_numpy(np.stack(list(older.values()))), fast=True)
                heads.update(zip(older, computed, strict=True))
        ids = [image_id for image_id in image_ids if image_id in heads]
        if not ids:
            return [], torch.empty(0)
        return ids, self.whole_latents([heads[i] for i in ids], heads=True)

    def embed_query(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """One ``(S, S)`` query image (an array, or a tensor on the encoder's device) -> (z ``(C, h, w)``, vector ``(D,)``).

        With query batching on (``query_batching``; auto = CUDA), concurrent callers share one
        encoder call; the result is the same as encoding the image alone.
        """
        if self._query_batching():
            return self._query_batcher().submit(pixels)
        z, vectors = self.embed_pixels(pixels[None])
        return z[0], vectors[0]

    def _query_batching(self) -> bool:
        mode = self.settings.query.batching
        if self.is_volume_space:  # volumes differ in shape and are encoded one at a time
            return False
        return mode == "on" or (mode == "auto" and self.encoder.device.type == "cuda")

    def _query_batcher(self) -> MicroBatcher:
        with self._lock:
            if self._batcher is None:
                self._batcher = MicroBatcher(
                    self.embed_pixels,
                    max_batch=self.settings.model.batch_size,
                    wait_seconds=self.settings.query.batch_wait_ms / 1000.0,
                    on_batch=lambda size: self.observe("query_batch_size", float(size)),
                )
            return self._batcher

    def stored_latent(self, image_id: int) -> np.ndarray:
        """The stored z of ``image_id`` under this space's encoder.

        Raises :class:`NotFoundError` saying which is the case: no such image, or an image that was
        ingested into another space only.
        """
        z = self.store.latent(image_id, self.space.encoder_key)
        if z is not None:
            return z
        if not self.store.images_by_id([image_id]):
            raise NotFoundError(f"image {image_id} does not exist", detail={"image_id": image_id})
        raise NotFoundError(
            f"image {image_id} has no latent in this space (it was ingested with another model or settings; "
            "GET /v1/spaces lists the spaces)",
            detail={"image_id": image_id, "space": self.space.key},
        )

    def readiness(self) -> dict[str, Any]:
        """Checks for ``/readyz``: the database answers, the model is loaded, the index equals the database.

        Each value is ``True`` or the reason it is not; it never raises and never loads the model.
        """
        checks: dict[str, Any] = {}
        try:
            self.store.ping()
            checks["database"] = True
        except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
            checks["database"] = f"{type(exc).__name__}: {exc}"
        checks["model_loaded"] = self.encoder_loaded
        if self.encoder_loaded and checks["database"] is True:
            count, _ = self.store.vector_stats(self.space.id)
            checks["index_consistent"] = self.searchable_index().count == count
        else:
            checks["index_consistent"] = False
        return checks

    # -- descriptions shared by JSON outputs

    def model_info(self) -> dict[str, Any]:
        weights = self.encoder.weights
        info = {"name": self.settings.model.name, "weights": weights.public_label, "weights_identity": weights.identity}
        if self.has_text_tower:
            clip = self.clip.source
            info |= {"clip_weights": clip.public_label, "clip_weights_identity": clip.identity,
                     "clip_tokenizer": clip.tokenizer_label}
        return info

    def space_info(self) -> dict[str, Any]:
        from retrieval.spaces import space_json  # spaces.py builds on this module

        return space_json(self.space)

    def close(self, *, keep_store: bool = False) -> None:
        """Stop the query batcher and save the index; close the store unless another service shares it."""
        if self._batcher is not None:
            self._batcher.close()
        if self._index is not None:
            self._index.save()
        if not keep_store:
            self.store.close()


def _by_shape(latents: Sequence[np.ndarray | torch.Tensor]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(positions, stacked float32 batch)`` per distinct latent shape, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, latent in enumerate(latents):
        groups.setdefault(tuple(latent.shape), []).append(position)
    for positions in groups.values():
        yield positions, torch.stack([torch.as_tensor(latents[i], dtype=torch.float32) for i in positions])
