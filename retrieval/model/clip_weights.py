"""Where BiomedCLIP's weights and tokenizer come from, and the identity recorded for them in a space.

Chosen like MedVAE's (:mod:`retrieval.model.weights`), explicitly by ``Settings.clip``, never a
silent fallback:

* ``hub``: ``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` of ``clip.repo`` at
  ``clip.revision`` into the normal Hugging Face cache (open_clip's own hub loader takes no
  revision, so the two files are fetched here and handed to open_clip); identity
  ``hub:<repo>@<commit>:sha256:<checkpoint>``. The tokenizer is the hub's PubMedBERT tokenizer
  that the config names.
* a local folder (``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` / ``.safetensors``,
  tokenizer files beside them) or a checkpoint file; identity ``sha256:<checkpoint>``.
* ``random``: the exact architecture, seeded; identity ``random-init:seed=N``, loud everywhere.

The architecture is always built from the configuration bundled in
``manifests/biomedclip/`` (so it builds offline, the PubMedBERT text tower included); a hub or
folder configuration that differs from it in anything that shapes the model is refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.config import ClipSettings
from retrieval.errors import WeightsError
from retrieval.model.hub import hub_reachable
from retrieval.model.weights import RANDOM_WEIGHTS_LABEL, sha256_file

logger = logging.getLogger(__name__)

CLIP_HEAD = "biomedclip"
"""The pooling name of the semantic head (``RETRIEVAL_POOLING=biomedclip``)."""
BUNDLED = Path(__file__).parent / "manifests" / "biomedclip"
BUNDLED_CONFIG = BUNDLED / "open_clip_config.json"
BUNDLED_TEXT_CONFIG = BUNDLED / "pubmedbert"  # PubMedBERT's config.json: AutoConfig reads it from this folder
CONFIG_NAME = "open_clip_config.json"
CHECKPOINT_NAMES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")

CLIP_RANDOM_WARNING = (
    "WARNING: BiomedCLIP is running with RANDOM-INITIALISED weights (clip_weights=random): semantic vectors, "
    "text search and zero-shot scores are pipeline tests, not clinically meaningful."
)
GENERATED_VOCABULARY_WARNING = (
    "WARNING: BiomedCLIP's tokenizer is a GENERATED test vocabulary (clip_tokenizer=generated), not PubMedBERT's: "
    "text queries are pipeline tests."
)
#: what shapes the model: a loaded configuration must agree with the bundled one on these
ARCHITECTURE_KEYS = (
    ("model_cfg", "embed_dim"),
    ("model_cfg", "vision_cfg", "timm_model_name"),
    ("model_cfg", "vision_cfg", "timm_pool"),
    ("model_cfg", "vision_cfg", "timm_proj"),
    ("model_cfg", "vision_cfg", "image_size"),
    ("model_cfg", "text_cfg", "hf_proj_type"),
    ("model_cfg", "text_cfg", "hf_pooler_type"),
    ("model_cfg", "text_cfg", "context_length"),
    ("preprocess_cfg", "mean"),
    ("preprocess_cfg", "std"),
)


@dataclass(frozen=True)
class ClipSource:
    """A resolved BiomedCLIP choice: the checkpoint to load (none for random), the tokenizer and the identity."""

    kind: str  # "hub" | "path" | "random"
    identity: str
    checkpoint: Path | None
    tokenizer: Path | None  # a folder AutoTokenizer reads; None = the generated test vocabulary
    seed: int = 0

    @property
    def is_placeholder(self) -> bool:
        return self.kind == "random"

    @property
    def public_label(self) -> str:
        return RANDOM_WEIGHTS_LABEL if self.is_placeholder else self.identity

    @property
    def tokenizer_label(self) -> str:
        return "generated-vocabulary" if self.tokenizer is None else str(self.tokenizer)

    def warnings(self) -> list[str]:
        """What every output says about these weights and this tokenizer (empty for the real ones)."""
        return placeholder_warnings(random=self.is_placeholder, generated=self.tokenizer is None)


def placeholder_warnings(*, random: bool, generated: bool) -> list[str]:
    """The warnings for random BiomedCLIP weights and for the generated test vocabulary."""
    return ([CLIP_RANDOM_WARNING] if random else []) + ([GENERATED_VOCABULARY_WARNING] if generated else [])


def clip_setting_warnings(clip: ClipSettings) -> list[str]:
    """The warnings that ``clip`` settings alone imply (random weights, the generated vocabulary), without loading:
    what :meth:`ClipSource.warnings` will say once :func:`resolve_clip` has run (random weights and ``auto`` mean
    the generated vocabulary)."""
    random = clip.weights == "random"
    return placeholder_warnings(random=random, generated=clip.tokenizer == "generated" or (random and clip.tokenizer == "auto"))


def bundled_config() -> dict[str, Any]:
    return json.loads(BUNDLED_CONFIG.read_text())


def check_config(loaded: dict[str, Any], where: str) -> None:
    """Refuse a configuration whose architecture differs from the bundled BiomedCLIP one (naming the keys)."""
    reference, differences = bundled_config(), []
    for path in ARCHITECTURE_KEYS:
        ours, theirs = _lookup(reference, path), _lookup(loaded, path)
        if ours != theirs:
            differences.append(f"{'.'.join(path)}: {theirs!r} (BiomedCLIP: {ours!r})")
    if differences:
        raise WeightsError(f"{where} is not BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's architecture: "
                           + "; ".join(differences), detail={"field": "clip_weights"})


def _lookup(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = config
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def resolve_clip(clip: ClipSettings) -> ClipSource:
    """Turn the ``clip`` settings into a :class:`ClipSource`; raises :class:`WeightsError` naming the setting."""
    if clip.weights == "random":
        return ClipSource("random", f"{RANDOM_WEIGHTS_LABEL}:seed={clip.seed}", None,
                          _tokenizer(clip, default=None), clip.seed)
    if clip.weights == "hub":
        return _from_hub(clip)
    path = Path(clip.weights).expanduser()
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            check_config(json.loads(config.read_text()), str(config))
        checkpoint = next((path / name for name in CHECKPOINT_NAMES if (path / name).is_file()), None)
        if checkpoint is None:
            raise WeightsError(f"clip_weights: {path} holds none of {', '.join(CHECKPOINT_NAMES)}",
                               detail={"field": "clip_weights"})
        folder_tokenizer = path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
    elif path.is_file():
        checkpoint, folder_tokenizer = path, None
    else:
        raise WeightsError(f"clip_weights: {path} is neither a folder nor a file; use `hub`, `random` or a path",
                           detail={"field": "clip_weights", "value": clip.weights})
    tokenizer = _tokenizer(clip, default=folder_tokenizer)
    if tokenizer is None and clip.tokenizer == "auto":
        raise WeightsError(f"clip_weights: {path} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); set "
                           "RETRIEVAL_CLIP_TOKENIZER to PubMedBERT's tokenizer folder", detail={"field": "clip_tokenizer"})
    return ClipSource("path", f"sha256:{sha256_file(checkpoint)}", checkpoint.resolve(), tokenizer)


def _tokenizer(clip: ClipSettings, *, default: Path | None) -> Path | None:
    """The tokenizer folder ``clip.tokenizer`` names: ``auto`` = ``default``, ``generated`` = None (loud)."""
    choice = clip.tokenizer
    if choice == "auto":
        return default
    if choice == "generated":
        return None
    folder = Path(choice).expanduser()
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise WeightsError(f"clip_tokenizer: {folder} holds no {' or '.join(TOKENIZER_FILES)}",
                           detail={"field": "clip_tokenizer", "value": choice})
    return folder.resolve()


def _from_hub(clip: ClipSettings) -> ClipSource:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, revision = clip.repo, clip.revision
    online = hub_reachable()
    try:
        config = Path(hf_hub_download(repo, CONFIG_NAME, revision=revision, local_files_only=not online))
        checkpoint = Path(hf_hub_download(repo, CHECKPOINT_NAMES[0], revision=revision, local_files_only=not online))
        loaded = json.loads(config.read_text())
        tokenizer_repo = loaded["model_cfg"]["text_cfg"]["hf_tokenizer_name"]
        tokenizer = (_tokenizer(clip, default=None) if clip.tokenizer != "auto" else Path(snapshot_download(
            tokenizer_repo, allow_patterns=["*.txt", "*.json"], local_files_only=not online)))
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, auth, missing revision: all end the same way for the user
        where = "cannot be reached from this machine and they are not in the local cache" if not online else (
            f"refused them: {type(exc).__name__}: {exc}")
        raise WeightsError(
            f"BiomedCLIP weights ({repo}@{revision}): the Hugging Face hub {where}. Set RETRIEVAL_CLIP_WEIGHTS to a "
            "local folder (open_clip_config.json, open_clip_pytorch_model.bin, tokenizer files), or to `random` for a "
            "pipeline test (not clinically meaningful).",
            detail={"field": "clip_weights", "repo": repo, "revision": revision}) from None
    check_config(loaded, f"{repo}@{revision}/{CONFIG_NAME}")
    match = re.search(r"snapshots/([0-9a-f]{40})/", checkpoint.as_posix())
    commit = match.group(1) if match else revision
    return ClipSource("hub", f"hub:{repo}@{commit}:sha256:{sha256_file(checkpoint)}", checkpoint, tokenizer)


# -- the generated test vocabulary

RADIOLOGY_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "pleural effusion cardiomegaly pneumothorax consolidation atelectasis edema pneumonia nodule mass fracture "
    "opacity infiltrate emphysema fibrosis hernia lesion normal abnormal no finding findings chest lung lungs heart "
    "right left bilateral upper lower lobe small large mild moderate severe x ray radiograph ct mri scan brain "
    "knee spine abdomen pelvis bone image photo of a the with and or in this is there support device tube line"
).split()


def generated_vocabulary() -> list[str]:
    """A small WordPiece vocabulary that tokenises any lower-case English text: BERT's special tokens, whole
    radiology words, single characters and their ``##`` continuations. For tests only (said loudly)."""
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,;:!?-/()'\"%")
    words = sorted(set(RADIOLOGY_WORDS) - set(characters))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters), *words]


def write_generated_tokenizer(folder: Path) -> Path:
    """Write the generated vocabulary as a BERT tokenizer folder (``vocab.txt`` + ``tokenizer_config.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(generated_vocabulary()) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return folder
