"""What the service knows about each MedVAE model: architecture, hub files, LoRA.

The hub YAML of a model is authoritative when it can be downloaded; the ``ddconfig`` bundled here
mirrors it so that explicitly requested random-initialised weights (and local checkpoints given
without a config) build the exact architecture offline. ``medvae_8_4_2d`` is the latent-diffusion
kl-f8 autoencoder (ch 128, ch_mult 1-2-4-4): 631 GFLOP per 384x384 encode with LoRA, 1,426 GFLOP
per decode, 84.5 M parameters with LoRA r=4 injected into every ResnetBlock/AttnBlock conv.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retrieval.errors import ConfigurationError

LORA_TARGETS = frozenset({"ResnetBlock", "AttnBlock"})
LORA_RANK = 4


@dataclass(frozen=True)
class Architecture:
    """A MedVAE model (2-D or 3-D) as the ``medvae`` package builds it."""

    name: str
    hub_config: str
    hub_checkpoint: str
    ddconfig: dict[str, Any] = field(hash=False)
    embed_dim: int
    lora: bool  # True when medvae injects LoRA (r=4) before loading the checkpoint
    dims: int = 2  # 3 = volumes (AutoencoderKL_3D, one vector per series)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def in_channels(self) -> int:
        return int(self.ddconfig["in_channels"])


def _kl_config(*, ch_mult: list[int], z_channels: int, in_channels: int = 3) -> dict[str, Any]:
    return {
        "double_z": True,
        "z_channels": z_channels,
        "resolution": 256,
        "in_channels": in_channels,
        "out_ch": in_channels,
        "ch": 128,
        "ch_mult": ch_mult,
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


ARCHITECTURES: dict[str, Architecture] = {
    "medvae_8_4_2d": Architecture(
        name="medvae_8_4_2d",
        hub_config="model_weights/medvae_8x4.yaml",
        hub_checkpoint="model_weights/vae_8x_4c_2D.ckpt",
        ddconfig=_kl_config(ch_mult=[1, 2, 4, 4], z_channels=4),
        embed_dim=4,
        lora=True,
    ),
    "medvae_4_3_2d": Architecture(
        name="medvae_4_3_2d",
        hub_config="model_weights/medvae_4x3.yaml",
        hub_checkpoint="model_weights/vae_4x_3c_2D.ckpt",
        ddconfig=_kl_config(ch_mult=[1, 2, 4], z_channels=3),
        embed_dim=3,
        lora=True,
    ),
    # One grayscale channel, no LoRA: medvae builds these from the flat YAML (ddconfig, embed_dim)
    # and loads the checkpoint as it is; its loaders average an image's channels for them.
    "medvae_4_1_2d": Architecture(
        name="medvae_4_1_2d",
        hub_config="model_weights/medvae_4x1.yaml",
        hub_checkpoint="model_weights/vae_4x_1c_2D.ckpt",
        ddconfig=_kl_config(ch_mult=[1, 2, 4], z_channels=1, in_channels=1),
        embed_dim=1,
        lora=False,
    ),
    "medvae_8_1_2d": Architecture(
        name="medvae_8_1_2d",
        hub_config="model_weights/medvae_8x1.yaml",
        hub_checkpoint="model_weights/vae_8x_1c_2D.ckpt",
        ddconfig=_kl_config(ch_mult=[1, 2, 4, 4], z_channels=1, in_channels=1),
        embed_dim=1,
        lora=False,
    ),
    # The 3-D models share their hub YAML with the 2-D 4x1/8x1 models (medvae's factory loads
    # `medvae_4x1.yaml` for both) and take one channel. The layout below is the 4x/8x kl layout
    # with one latent channel; the hub YAML, when it can be downloaded, is used instead.
    "medvae_4_1_3d": Architecture(
        name="medvae_4_1_3d",
        hub_config="model_weights/medvae_4x1.yaml",
        hub_checkpoint="model_weights/vae_4x_1c_3D.ckpt",
        ddconfig=_kl_config(ch_mult=[1, 2, 4], z_channels=1, in_channels=1),
        embed_dim=1,
        lora=False,
        dims=3,
    ),
    "medvae_8_1_3d": Architecture(
        name="medvae_8_1_3d",
        hub_config="model_weights/medvae_8x1.yaml",
        hub_checkpoint="model_weights/vae_8x_1c_3D.ckpt",
        ddconfig=_kl_config(ch_mult=[1, 2, 4, 4], z_channels=1, in_channels=1),
        embed_dim=1,
        lora=False,
        dims=3,
    ),
}


def model_dims(model_name: str) -> int:
    """2 (images) or 3 (volumes) for a model name; unknown names count as 2-D and are refused on load."""
    architecture = ARCHITECTURES.get(model_name)
    return architecture.dims if architecture is not None else 2


def get_architecture(model_name: str) -> Architecture:
    """The architecture of a supported model, or a :class:`ConfigurationError` naming the choices."""
    try:
        return ARCHITECTURES[model_name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigurationError(
            f"model {model_name!r} is not supported; choose one of: {known}",
            detail={"field": "model", "value": model_name},
        ) from None


def ddconfig_from_yaml(path: str) -> tuple[dict[str, Any], int]:
    """Read ``(ddconfig, embed_dim)`` from a MedVAE YAML (flat or ``model.params`` layout)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(conf, dict)
    params = conf.get("model", {}).get("params", conf) if "model" in conf else conf
    if "ddconfig" not in params or "embed_dim" not in params:
        raise ConfigurationError(f"{path}: no ddconfig/embed_dim in this MedVAE config", detail={"path": path})
    return dict(params["ddconfig"]), int(params["embed_dim"])
