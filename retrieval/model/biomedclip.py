"""BiomedCLIP on MedVAE's stage-2 latent: the semantic head (``pooling=biomedclip``) and its text tower.

MedVAE's stage 2 trains the projection head with one objective (StanfordMIMI/MedVAE,
``medvae/losses/vae_losses.py``, ``BiomedClipLoss.forward``, 2-D branch): BiomedCLIP's image
embedding of the image x in [-1, 1] (``clamp((x + 1) / 2)``, 3 channels, T) and of the stage-2
latent s2 (``s2 / 4.6``, mean over channels, 3 channels, T) are pulled together by
``||f_image - f_latent||^2``, where T = Resize(224, bicubic, antialias) -> CenterCrop(224) ->
Normalize(OpenAI CLIP mean/std) and the CLIP is open_clip's
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, frozen.

So :meth:`BiomedClip.embed_latents` (that recipe on the stored s2) gives the vector MedVAE was
trained to make equal to BiomedCLIP's embedding of the image itself, in one space with
BiomedCLIP's text tower (:meth:`BiomedClip.embed_texts`). Vectors are L2-normalised, 512 values.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.config import ClipSettings
from retrieval.errors import WeightsError
from retrieval.model.clip_weights import (
    BUNDLED_TEXT_CONFIG,
    ClipSource,
    bundled_config,
    resolve_clip,
    write_generated_tokenizer,
)

logger = logging.getLogger(__name__)

LATENT_SCALE = 4.6
"""``BiomedClipLoss`` divides the stage-2 latent by this before BiomedCLIP sees it."""
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH = 32
"""Images per forward pass of the image tower."""


def clip_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """T of ``BiomedClipLoss``: Resize(224, bicubic, antialias) -> CenterCrop(224) -> Normalize(CLIP mean, std),
    with torchvision's own transforms, as the loss uses them (imported here: a second of start-up otherwise)."""
    from torchvision.transforms import (
        CenterCrop,
        Compose,
        InterpolationMode,
        Normalize,
        Resize,
    )

    return Compose([
        Resize(size=CLIP_SIZE, interpolation=InterpolationMode.BICUBIC, max_size=None, antialias=True),
        CenterCrop(size=(CLIP_SIZE, CLIP_SIZE)),
        Normalize(mean=list(CLIP_MEAN), std=list(CLIP_STD)),
    ])


def latent_clip_input(s2: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` stage-2 latents -> BiomedCLIP's ``(B, 3, 224, 224)`` input, exactly as the loss makes it."""
    latent = s2.float() / LATENT_SCALE
    latent = latent.mean(1, keepdim=True)
    return clip_transform()(latent.expand(-1, 3, -1, -1))


def image_clip_input(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, S, S)`` model input in [-1, 1] -> BiomedCLIP's input for the image itself (the loss's other side)."""
    image = torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return clip_transform()(image.expand(-1, 3, -1, -1))


def _open_clip() -> ModuleType:
    """open_clip, imported with ``wandb`` hidden: timm imports it optionally (``except ImportError``), and the
    wandb 0.14 that medvae pins fails on NumPy 2 with an AttributeError instead."""
    if "open_clip" not in sys.modules and "wandb" not in sys.modules:
        sys.modules["wandb"] = None  # type: ignore[assignment] - makes `import wandb` raise ImportError
        try:
            with warnings.catch_warnings():  # open_clip 2.24 imports timm.models.layers, deprecated since timm 0.9
                warnings.simplefilter("ignore", FutureWarning)
                import open_clip
        finally:
            del sys.modules["wandb"]
    import open_clip

    return open_clip


def build_clip_model(seed: int | None = None) -> torch.nn.Module:
    """BiomedCLIP's architecture from the bundled configuration (offline): ViT-B/16 at 224 (timm), PubMedBERT
    (``transformers``, config bundled), MLP text projection, 512-d. Random weights, seeded when ``seed`` is given."""
    CustomTextCLIP = _open_clip().model.CustomTextCLIP
    model_cfg = bundled_config()["model_cfg"]
    text_cfg = dict(model_cfg["text_cfg"], hf_model_name=str(BUNDLED_TEXT_CONFIG), hf_model_pretrained=False)
    text_cfg.pop("hf_tokenizer_name")
    if seed is not None:
        torch.manual_seed(seed)
    model = CustomTextCLIP(embed_dim=model_cfg["embed_dim"], vision_cfg=model_cfg["vision_cfg"], text_cfg=text_cfg)
    return model.eval()


class BiomedClip:
    """BiomedCLIP's image and text towers, frozen, in fp32; thread-safe (one forward at a time)."""

    def __init__(self, source: ClipSource, device: torch.device) -> None:
        self.source = source
        self.device = device
        self.model = build_clip_model(seed=source.seed if source.checkpoint is None else None)
        if source.checkpoint is not None:
            self._load(source.checkpoint)
        self.model.to(device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = _tokenizer(source)
        self.pad_token_id = int(self.model.text.config.pad_token_id)
        self._lock = threading.Lock()

    def _load(self, checkpoint: Path) -> None:
        try:
            _open_clip().factory.load_checkpoint(self.model, str(checkpoint), strict=True)
        except Exception as exc:  # noqa: BLE001 - wrong keys or shapes (RuntimeError, KeyError, ...): not BiomedCLIP
            raise WeightsError(f"clip_weights: {checkpoint} does not load into BiomedCLIP: {type(exc).__name__}: "
                               f"{str(exc)[:400]}", detail={"field": "clip_weights"}) from None

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (``exp`` of the stored log scale): zero-shot logits are ``scale * cosine``."""
        return float(self.model.logit_scale.exp())

    @torch.inference_mode()
    def embed_latents(self, s2: torch.Tensor) -> np.ndarray:
        """``(B, C, h, w)`` stage-2 latents -> ``(B, 512)`` L2-normalised float32 (the ``biomedclip`` head)."""
        return self._encode_image(latent_clip_input(s2))

    def _encode_image(self, clip_input: torch.Tensor) -> np.ndarray:
        parts = []
        for chunk in clip_input.split(BATCH):  # bounds the activations' memory of a large re-index chunk
            with self._lock:
                parts.append(self.model.encode_image(chunk.to(self.device)).float())
        return F.normalize(torch.cat(parts), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(N, 512)`` L2-normalised float32 in the same space as the image embeddings.

        open_clip pads every text to the 256-token context; the padding is masked out of BERT's attention, so
        it is cut to the longest text here (the same embedding, ~10x less work for a short query)."""
        tokens = self.tokenizer(list(texts))
        longest = int((tokens != self.pad_token_id).sum(dim=1).max())
        tokens = tokens[:, :max(longest, 1)].to(self.device)
        with self._lock:
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu().numpy()


def _tokenizer(source: ClipSource) -> object:
    """open_clip's HF tokenizer (its cleaning, padding to the 256-token context) on the source's tokenizer folder,
    or on the generated test vocabulary."""
    HFTokenizer = _open_clip().tokenizer.HFTokenizer
    context = bundled_config()["model_cfg"]["text_cfg"]["context_length"]
    try:
        if source.tokenizer is not None:
            return HFTokenizer(str(source.tokenizer), context_length=context)
        with tempfile.TemporaryDirectory(prefix="biomedclip-vocab-") as folder:
            return HFTokenizer(str(write_generated_tokenizer(Path(folder))), context_length=context)
    except OSError as exc:
        raise WeightsError(f"clip_tokenizer: {source.tokenizer_label} is not a tokenizer: {exc}",
                           detail={"field": "clip_tokenizer"}) from None


def load_clip(clip: ClipSettings, device: torch.device) -> BiomedClip:
    """The configured BiomedCLIP on ``device``, built once per process and choice (spaces of one server share it)."""
    return _load_cached(clip, str(device))


@cache
def clip_source(clip: ClipSettings) -> ClipSource:
    """The resolved weights of ``clip`` (downloaded and hashed once per process), without building the model:
    enough to know a space's identity."""
    return resolve_clip(clip)


@cache
def _load_cached(clip: ClipSettings, device: str) -> BiomedClip:
    source = clip_source(clip)
    logger.info("BiomedCLIP %s on %s (tokenizer %s)", source.identity, device, source.tokenizer_label)
    return BiomedClip(source, torch.device(device))
