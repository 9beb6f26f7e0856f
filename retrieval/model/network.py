"""The MedVAE network itself: built through the ``medvae`` package's classes, loaded from a checkpoint,
and rewritten for speed without changing its function (LoRA folded into the convolutions, attention
through ``scaled_dot_product_attention``). :class:`~retrieval.model.encoder.MedVAEEncoder` runs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.domain.architectures import LORA_RANK, LORA_TARGETS, Architecture
from retrieval.errors import WeightsError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model surgery


def _medvae_model_classes(dims: int = 2) -> tuple[Any, Any]:
    """``(AutoencoderKL_2D or _3D, inject_trainable_lora_extended)`` from the installed ``medvae`` package.

    ``medvae/__init__.py`` only re-exports ``MVAE``, whose data loaders import MONAI, polars and
    the hub client: about 5 s per process, paid by every CLI command although none of it is used
    here. When ``medvae`` is not imported yet, its package module is registered without running
    that ``__init__``; the model and LoRA modules then load from the same files as usual, and the
    first lookup of anything else on the package (``from medvae import MVAE`` later in the same
    process) runs the ``__init__`` then, so medvae's own API still works as installed.
    """
    if "medvae" not in sys.modules:
        spec = importlib.util.find_spec("medvae")
        if spec is None or not spec.submodule_search_locations or spec.loader is None:
            raise WeightsError("the `medvae` package is not installed")
        package = importlib.util.module_from_spec(spec)
        loader = spec.loader

        def complete_import(name: str) -> Any:  # PEP 562: only called for a name the package does not hold yet
            if name.startswith("__") and name != "__all__":  # import machinery probes dunders: keep it cheap
                raise AttributeError(name)
            del package.__getattr__  # type: ignore[attr-defined]  # once: __init__ may fail or define its own
            loader.exec_module(package)
            return getattr(package, name)  # AttributeError (ImportError for `from medvae import x`) when it has none

        package.__getattr__ = complete_import  # type: ignore[attr-defined]
        sys.modules["medvae"] = package  # __init__ deferred; submodules import normally
    from medvae.utils.lora import inject_trainable_lora_extended

    if dims == 3:
        from medvae.models.autoencoder_kl_3d import AutoencoderKL as AutoencoderKL_3D

        return AutoencoderKL_3D, inject_trainable_lora_extended
    from medvae.models.autoencoder_kl import AutoencoderKL

    return AutoencoderKL, inject_trainable_lora_extended


def build_medvae_model(architecture: Architecture, ddconfig: dict[str, Any], embed_dim: int) -> nn.Module:
    """Construct ``medvae``'s AutoencoderKL_2D/_3D with LoRA injected exactly as ``medvae`` does."""
    autoencoder_class, inject_trainable_lora_extended = _medvae_model_classes(architecture.dims)

    with contextlib.redirect_stdout(io.StringIO()):  # medvae prints shapes while building
        model = autoencoder_class(ddconfig=ddconfig, embed_dim=embed_dim)
        if architecture.lora:
            inject_trainable_lora_extended(model, set(LORA_TARGETS), r=LORA_RANK)
    return model


def randomise_lora(model: nn.Module, generator: torch.Generator) -> None:
    """Give LoRA up-projections non-zero random values (medvae initialises them to zero).

    Only for ``random`` weights: it makes the LoRA path carry signal, so that folding it is
    really exercised by tests.
    """
    for module in model.modules():
        if hasattr(module, "lora_up") and hasattr(module, "lora_down"):
            with torch.no_grad():
                module.lora_up.weight.normal_(0.0, 0.02, generator=generator)


UNTRAINED_3D_HEAD = ("channel_ds.", "channel_proj.")
"""The 3-D models' stage-2 head: medvae_finetune.py never trains it, so a 3-D checkpoint may lack it."""


def load_checkpoint(model: nn.Module, path: Path, *, dims: int = 2) -> None:
    """Load a MedVAE checkpoint; refuses missing keys (except a 3-D model's untrained head) and mismatched shapes."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable PyTorch checkpoint ({exc})", detail={"path": str(path)}) from exc
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path}: checkpoint holds no state dict", detail={"path": str(path)})
    if all(key.startswith("model.") for key in state):
        state = {key.removeprefix("model."): value for key, value in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: checkpoint does not fit the architecture ({exc})", detail={"path": str(path)}) from exc
    if dims == 3:
        missing = [key for key in missing if not key.startswith(UNTRAINED_3D_HEAD)]
    if missing:
        raise WeightsError(
            f"{path}: checkpoint is missing {len(missing)} keys of the architecture, e.g. {missing[:5]}",
            detail={"path": str(path), "missing": list(missing)},
        )
    if unexpected:
        logger.warning("%s: ignoring %d unexpected keys, e.g. %s", path, len(unexpected), unexpected[:5])


def fold_lora(model: nn.Module) -> int:
    """Replace every LoRA-injected conv/linear by one plain layer with ``W + scale * up @ down``.

    Exact in real arithmetic (the LoRA branch is linear and runs on the same input; dropout is
    inactive in eval mode). Returns the number of layers folded.
    """
    folded = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (hasattr(child, "lora_up") and hasattr(child, "lora_down")):
                continue
            if not isinstance(child.selector, nn.Identity):
                raise WeightsError("cannot fold LoRA with a non-identity selector")
            base = child.conv if hasattr(child, "conv") else child.linear
            up = child.lora_up.weight.detach().flatten(1)  # (out, r)
            down = child.lora_down.weight.detach()  # (r, in, kh, kw) or (r, in)
            delta = (up @ down.flatten(1)).reshape(base.weight.shape) * child.scale
            with torch.no_grad():
                base.weight.add_(delta.to(base.weight.dtype))
            setattr(parent, name, base)
            folded += 1
    return folded


class FusedAttnBlock(nn.Module):
    """Same computation as medvae's 2-D and 3-D ``AttnBlock`` (single head, scale c^-0.5), through SDPA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - same contract as AttnBlock
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, *spatial = q.shape
        tokens = int(np.prod(spatial))
        q = q.reshape(b, 1, c, tokens).transpose(-1, -2)
        k = k.reshape(b, 1, c, tokens).transpose(-1, -2)
        v = v.reshape(b, 1, c, tokens).transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, *spatial)
        return x + self.proj_out(out)


def use_fused_attention(model: nn.Module) -> int:
    """Switch every medvae ``AttnBlock`` to :class:`FusedAttnBlock` in place (same weights)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "AttnBlock":
            module.__class__ = type("FusedAttnBlock", (FusedAttnBlock,), {})
            count += 1
    return count


def save_state_dict(model: nn.Module, path: Path) -> None:
    """Write ``{"state_dict": ...}`` the way MedVAE checkpoints are laid out."""
    torch.save({"state_dict": model.state_dict()}, path)
