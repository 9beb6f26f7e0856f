"""Where model weights come from, and the identity recorded for them in an embedding space.

Three sources, chosen explicitly by ``Settings.weights`` (never a silent fallback between them):

* ``hub``: ``hf_hub_download`` of the model's YAML and checkpoint from ``hub_repo`` at
  ``hub_revision`` into the normal Hugging Face cache; the resolved commit and the checkpoint's
  sha256 form the identity, so a space is tied to exact bytes.
* a local checkpoint path (optionally with ``model_config_path``); identity = its sha256.
* ``random``: seeded random initialisation of the exact architecture; identity
  ``random-init:seed=N``. Anything using it says so (CLI warning, ``"weights": "random-init"``).
* ``fake``: not MedVAE at all: :class:`retrieval.model.fake.FakeEncoder`, a deterministic stand-in
  with the encoder's contract for fast tests; identity ``fake-encoder:v1``, as loud as random.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from retrieval.config import Settings
from retrieval.domain.architectures import Architecture
from retrieval.errors import WeightsError
from retrieval.model.hub import hub_address, hub_reachable

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS_LABEL = "random-init"
RANDOM_WEIGHTS_WARNING = (
    "WARNING: MedVAE is running with RANDOM-INITIALISED weights (weights=random): "
    "vectors and previews are pipeline tests, not clinically meaningful similarity."
)
FAKE_ENCODER_LABEL = "fake-encoder"
FAKE_ENCODER_WARNING = (
    "WARNING: this is NOT MedVAE: the FAKE test encoder is running (weights=fake): "
    "vectors and previews come from a deterministic stand-in for tests, not from MedVAE."
)
#: labels of weights that are not MedVAE's trained weights, and what every output says about them
PLACEHOLDER_WARNINGS = {RANDOM_WEIGHTS_LABEL: RANDOM_WEIGHTS_WARNING, FAKE_ENCODER_LABEL: FAKE_ENCODER_WARNING}


def placeholder_label(identity_or_label: str) -> str | None:
    """``random-init`` / ``fake-encoder`` for placeholder weights (by identity or label), else ``None``."""
    for label in PLACEHOLDER_WARNINGS:
        if identity_or_label.startswith(label):
            return label
    return None


def weights_warning(choice: str) -> str | None:
    """The warning every output carries for a ``weights`` setting of ``random`` or ``fake``; else ``None``."""
    label = {"random": RANDOM_WEIGHTS_LABEL, "fake": FAKE_ENCODER_LABEL}.get(choice)
    return PLACEHOLDER_WARNINGS[label] if label else None


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights choice: files to load (if any) and the identity string for the space."""

    kind: str  # "hub" | "checkpoint" | "random" | "fake"
    identity: str
    checkpoint: Path | None = None
    config: Path | None = None
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    @property
    def is_placeholder(self) -> bool:
        """True for weights that are not MedVAE's trained ones (random or the fake encoder)."""
        return self.kind in ("random", "fake")

    @property
    def public_label(self) -> str:
        """What JSON outputs report under ``weights``."""
        return placeholder_label(self.identity) or self.identity


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(settings: Settings, architecture: Architecture) -> WeightsSource:
    """Turn ``settings.model.weights`` into a :class:`WeightsSource`; raises :class:`WeightsError`."""
    choice = settings.model.weights
    if choice == "random":
        return WeightsSource(kind="random", identity=f"{RANDOM_WEIGHTS_LABEL}:seed={settings.model.seed}", seed=settings.model.seed)
    if choice == "fake":
        return WeightsSource(kind="fake", identity=f"{FAKE_ENCODER_LABEL}:v1")
    if choice == "hub":
        return _download_from_hub(settings, architecture)
    path = Path(choice).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights: {path} is not a file; use `hub`, `random` or a checkpoint path",
            detail={"field": "weights", "value": choice},
        )
    config = settings.model.config_path
    if config is not None and not Path(config).is_file():
        raise WeightsError(f"model_config_path: {config} is not a file", detail={"field": "model_config_path"})
    return WeightsSource(
        kind="checkpoint", identity=f"sha256:{sha256_file(path)}", checkpoint=path.resolve(), config=config
    )


def _download_from_hub(settings: Settings, architecture: Architecture) -> WeightsSource:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise WeightsError("huggingface_hub is not installed") from exc
    repo, revision = settings.model.hub_repo, settings.model.hub_revision
    online = hub_reachable()  # seconds, where huggingface_hub would retry for half a minute
    try:
        config, checkpoint = (
            Path(hf_hub_download(repo_id=repo, filename=name, revision=revision, local_files_only=not online))
            for name in (architecture.hub_config, architecture.hub_checkpoint)
        )
    except Exception as exc:  # network, auth, missing revision: all end the same way for the user
        if not online:
            host, port = hub_address()
            raise WeightsError(
                f"the Hugging Face hub ({host}:{port}) cannot be reached from this machine and the {architecture.name} "
                f"weights ({repo}@{revision}) are not in the local cache. Set RETRIEVAL_WEIGHTS to a local checkpoint "
                "path, or to `random` for a pipeline test (not clinically meaningful).",
                detail={"field": "weights", "repo": repo, "revision": revision, "hub": host},
            ) from None
        raise WeightsError(
            f"could not download {architecture.name} weights from the Hugging Face hub "
            f"({settings.model.hub_repo}@{settings.model.hub_revision}): {type(exc).__name__}: {exc}. "
            "Set RETRIEVAL_WEIGHTS to a local checkpoint path, or to `random` for a pipeline test.",
            detail={"field": "weights", "repo": settings.model.hub_repo, "revision": settings.model.hub_revision},
        ) from exc
    match = re.search(r"snapshots/([0-9a-f]{40})/", checkpoint.as_posix())
    commit = match.group(1) if match else settings.model.hub_revision
    digest = sha256_file(checkpoint)
    logger.info("hub weights %s@%s sha256=%s", settings.model.hub_repo, commit, digest)
    return WeightsSource(
        kind="hub",
        identity=f"hub:{settings.model.hub_repo}@{commit}:sha256:{digest}",
        checkpoint=checkpoint,
        config=config,
    )
