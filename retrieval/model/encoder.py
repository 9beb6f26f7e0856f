"""Run MedVAE: build it through the ``medvae`` package's classes, load weights, encode and decode.

Contract:

* :meth:`MedVAEEncoder.encode` takes normalised square pixels ``(B, S, S)`` in ``[0, 1]`` and
  returns the posterior **mode** z ``(B, C, S/f, S/f)`` as float32 on the CPU. Never sampled, so
  encoding the same pixels twice gives the same z (bitwise on CPU fp32). A 3-D model takes volumes
  ``(B, X, Y, Z)`` (sides multiples of f) and returns ``(B, C, X/f, Y/f, Z/f)``; a volume with a side
  larger than ``volume_roi`` is encoded (and decoded) by sliding-window inference, as ``medvae`` does for 3-D.
* :meth:`MedVAEEncoder.s2_latent` maps z to the stage-2 latent ``channel_proj(channel_ds(z) + z)``.
* :meth:`MedVAEEncoder.decode` maps z back to ``(B, S, S)`` pixels in ``[0, 1]``.

Speed-ups that keep the function identical: LoRA folded into the conv weights after loading,
the attention block computed with ``scaled_dot_product_attention``, ``channels_last``, and
bf16 autocast on CUDA and on CPUs with bf16 matrix units (``precision="fp32"`` turns it off;
``precision="bf16-weights"`` holds the encoder's modules in bf16 instead, decision 37).
On the CPU, 2-D encoding runs in OpenVINO when it is installed (``runtime``; see
:mod:`retrieval.model.openvino_runtime`), in bf16 exactly where autocast would be.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.config import Settings
from retrieval.domain.architectures import (
    ddconfig_from_yaml,
    get_architecture,
)
from retrieval.errors import ConfigurationError, WeightsError
from retrieval.model.compile_cache import load_or_compile, package_path
from retrieval.model.network import (
    build_medvae_model,
    fold_lora,
    load_checkpoint,
    randomise_lora,
    use_fused_attention,
)
from retrieval.model.openvino_runtime import (
    Decode,
    OpenVinoModule,
    PosteriorMode,
    openvino_available,
)
from retrieval.model.weights import WeightsSource, resolve_weights

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# --------------------------------------------------------------------------- encoder


class AutocastPosteriorMode(nn.Module):
    """The posterior mode (:class:`PosteriorMode`) under the encoder's autocast (``dtype``; None: none), its input cast to
    ``input_dtype`` (bf16 for bf16 weights), float32 out: what the encoder runs, eager or compiled."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype | None,
                 input_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.posterior_mode = PosteriorMode(model)
        self.device_type, self.dtype, self.input_dtype = device_type, dtype, input_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        with torch.autocast(device_type=self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            return self.posterior_mode(x.to(self.input_dtype)).float()



class MedVAEEncoder:
    """A loaded MedVAE model ready for batched, deterministic encoding and decoding."""

    def __init__(self, settings: Settings, *, fold: bool = True, fused_attention: bool = True,
                 channels_last: bool = True) -> None:
        self.settings = settings
        # channels_last is faster; on the CPU PyTorch's GroupNorm then keeps ~4e-4 relative in fp32 (3e-6
        # contiguous), so `verify-weights` compares medvae's module with ours in the contiguous layout
        self.channels_last = channels_last
        self.architecture = get_architecture(settings.model.name)
        self.weights: WeightsSource = resolve_weights(settings, self.architecture)
        self.device = self._pick_device(settings.model.device)
        self.autocast_dtype = self._pick_precision(settings.model.precision)
        # the posterior's modules (encoder, quant_conv) held and run in bf16: no casts around every GroupNorm, which
        # autocast runs in fp32 (46 % of the eager encoder's GPU time was copies, H200 profile, docs/benchmarks.md)
        self.bf16_weights = settings.model.precision == "bf16-weights"
        self._lock = threading.Lock()
        # 2-D only: volumes come in many shapes, and each new shape would compile again
        self.compiled = self.dims == 2 and (
            settings.model.compile == "on" or (settings.model.compile == "auto" and self.device.type == "cuda"))
        self.model = self._build(fold=fold, fused_attention=fused_attention)
        self.openvino = self._openvino(settings.model.runtime)
        self._decoder_ov: OpenVinoModule | None = None
        self._compiled_posterior: Any = None  # the AOTInductor package's runner, when compiled
        # when compiled: "cold" (built at this start) | "warm" (loaded) | "unusable" (it crashed a test process)
        self.compile_cache: str | None = None
        # what PyTorch runs to encode, eager or compiled: bf16 weights take bf16 input and no autocast
        self._posterior = (AutocastPosteriorMode(self.model, self.device.type, None, torch.bfloat16) if self.bf16_weights
                           else AutocastPosteriorMode(self.model, self.device.type, self.autocast_dtype))
        if self.compiled:  # at load, from the data dir's package when it has this encoder's (decision 34)
            size, batch = settings.model.input_size, settings.model.batch_size
            example = self.to_model_input(np.zeros((batch, size, size), np.float32))
            self._compiled_posterior, self.compile_cache = load_or_compile(
                self._posterior, example, self._compiled_package_path(fold=fold, fused_attention=fused_attention))
            self.compiled = self._compiled_posterior is not None  # unusable: the eager model, any batch size
        logger.info(
            "MedVAE %s loaded (%s) on %s, precision %s",
            self.architecture.name,
            self.weights.identity,
            self.device,
            self.precision_label,
        )

    # -- construction

    @staticmethod
    def _pick_device(choice: str) -> torch.device:
        if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise WeightsError("device=cuda requested but CUDA is not available", detail={"field": "device"})
            return torch.device("cuda")
        return torch.device("cpu")

    def _pick_precision(self, choice: str) -> torch.dtype | None:
        if choice == "fp32":
            return None
        if choice in ("bf16", "bf16-weights"):  # bf16 weights: autocast still serves the decoder and the fast s2 head
            return torch.bfloat16
        if self.device.type == "cuda" or cpu_has_bf16():
            return torch.bfloat16
        return None

    def _openvino(self, choice: str) -> OpenVinoModule | None:
        """The OpenVINO encoder for CPU encoding (``runtime``: auto = when installed, 2-D, CPU)."""
        usable = self.device.type == "cpu" and self.dims == 2 and not self.compiled and not self.bf16_weights
        if choice == "torch" or (choice == "auto" and not (usable and openvino_available())):
            return None
        if not usable:
            raise ConfigurationError(
                "runtime=openvino encodes 2-D models on the CPU only, uncompiled, with precision auto, fp32 or bf16 "
                "(set RETRIEVAL_RUNTIME=torch or auto)",
                detail={"field": "runtime"},
            )
        if not openvino_available():
            raise ConfigurationError("runtime=openvino needs the `openvino` package", detail={"field": "runtime"})
        size = self.settings.model.input_size
        return self._openvino_module(PosteriorMode(self.model), "encoder", (self.architecture.in_channels, size, size))

    def _openvino_module(self, module: nn.Module, name: str, item_shape: tuple[int, ...]) -> OpenVinoModule:
        return OpenVinoModule(
            module, name=name, item_shape=item_shape, identity=f"{self.architecture.name}:{self.weights.identity}",
            bf16=self.autocast_dtype is not None, threads=torch.get_num_threads(),
            cache_dir=self.settings.storage.data_dir / "openvino",
        )

    def _openvino_decoder(self, latent_shape: tuple[int, ...]) -> OpenVinoModule:
        """The decoder in OpenVINO, converted on the first decode (previews) when the encoder runs there too."""
        if self._decoder_ov is None:
            self._decoder_ov = self._openvino_module(Decode(self.model), "decoder", latent_shape)
        return self._decoder_ov

    def _build(self, *, fold: bool, fused_attention: bool) -> nn.Module:
        ddconfig, embed_dim = self.architecture.ddconfig, self.architecture.embed_dim
        if self.weights.config is not None:
            ddconfig, embed_dim = ddconfig_from_yaml(str(self.weights.config))
        if self.weights.is_random:
            torch.manual_seed(int(self.weights.seed or 0))
        model = build_medvae_model(self.architecture, ddconfig, embed_dim)
        if self.weights.is_random:
            generator = torch.Generator().manual_seed(int(self.weights.seed or 0) + 1)
            randomise_lora(model, generator)
        else:
            assert self.weights.checkpoint is not None
            load_checkpoint(model, self.weights.checkpoint, dims=self.dims)
        model.eval().requires_grad_(False)
        if fold:
            fold_lora(model)
        if fused_attention:
            use_fused_attention(model)
        model = model.to(self.device).to(memory_format=self._memory_format)
        if self.bf16_weights:  # the decoder and the stage-2 head keep float32 weights
            model.encoder.to(torch.bfloat16)
            model.quant_conv.to(torch.bfloat16)
        return model

    def _compiled_package_path(self, *, fold: bool, fused_attention: bool) -> Path:
        """The compiled package of this encoder: named by what decides its compiled code."""
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        capability = list(torch.cuda.get_device_capability(self.device)) if self.device.type == "cuda" else []
        return package_path(self.settings.storage.data_dir / "compile-cache", {
            "model": self.architecture.name, "weights": self.weights.identity, "device": device,
            "capability": capability, "input_size": self.settings.model.input_size,
            "batch_size": self.settings.model.batch_size, "autocast": str(self.autocast_dtype),
            "bf16_weights": self.bf16_weights,
            "channels_last": self.channels_last, "fold": fold, "fused_attention": fused_attention,
        })

    # -- properties

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.architecture.dims

    @property
    def _memory_format(self) -> torch.memory_format:
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.dims == 2 else torch.channels_last_3d

    @property
    def latent_channels(self) -> int:
        return int(self.model.embed_dim)

    @property
    def downsample(self) -> int:
        return self.architecture.downsample

    @property
    def precision_label(self) -> str:
        if self.openvino is not None:
            return f"openvino-{self.openvino.precision}"
        if self.bf16_weights:
            return "bf16-weights"
        return "bf16-autocast" if self.autocast_dtype is not None else "fp32"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- inference

    def to_model_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, S, S[, S])`` in [0, 1] -> ``(B, in_channels, S, S[, S])`` in [-1, 1] on the device."""
        tensor = torch.as_tensor(pixels, dtype=torch.float32)
        if tensor.ndim != self.dims + 1:
            shape = "(B, S, S)" if self.dims == 2 else "(B, X, Y, Z)"
            raise ValueError(f"expected {shape} pixels for {self.architecture.name}, got shape {tuple(tensor.shape)}")
        tensor = tensor.to(self.device, non_blocking=True).mul(2.0).sub(1.0)
        tensor = tensor.unsqueeze(1).expand(-1, self.architecture.in_channels, *([-1] * self.dims))
        return tensor.contiguous(memory_format=self._memory_format)

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Posterior mode z, float32 on the CPU, for a batch of normalised square images.

        A compiled encoder always runs full ``batch_size`` batches (a short batch is zero-padded,
        a long one split), so it is compiled once, at load, and never again for a new shape.
        """
        count = len(pixels)
        if self.compiled and count != self.settings.model.batch_size:
            step = self.settings.model.batch_size
            parts = [self._encode_full(pixels[i : i + step]) for i in range(0, count, step)]
            return torch.cat(parts)[:count]
        return self._encode_full(pixels)

    def _encode_full(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = self.to_model_input(pixels)
        count = x.shape[0]
        if self.compiled and count < self.settings.model.batch_size:
            padding = x.new_zeros((self.settings.model.batch_size - count, *x.shape[1:]))
            x = torch.cat([x, padding]).contiguous(memory_format=self._memory_format)
        return self.encode_core(x)[:count].float().contiguous().cpu()

    def encode_core(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (:meth:`to_model_input`) -> posterior mean, on the device: the core step,
        run by OpenVINO or PyTorch, window by window for cubes larger than ``volume_roi``."""
        if self.openvino is not None:
            with self._lock:
                return self.openvino(x.contiguous())
        if self._compiled_posterior is not None:  # always a full batch_size batch (see encode)
            with self._lock:
                return self._compiled_posterior(x)
        with self._lock:
            if self._needs_sliding_window(x.shape[2:]):
                return self._sliding_window(x, self._posterior, roi=self.settings.model.volume_roi)
            return self._posterior(x)

    def _needs_sliding_window(self, spatial: torch.Size | tuple[int, ...]) -> bool:
        return self.dims == 3 and max(spatial) > self.settings.model.volume_roi

    @staticmethod
    def _sliding_window(x: torch.Tensor, predictor: Any, *, roi: int) -> torch.Tensor:
        """MONAI sliding-window inference (25 % overlap, Gaussian blending); the predictor may
        change the spatial size by a fixed factor (the encoder /f, the decoder xf)."""
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            x, roi_size=(roi,) * (x.ndim - 2), sw_batch_size=1, predictor=predictor, overlap=0.25, mode="gaussian"
        )

    @torch.inference_mode()
    def s2_latent(self, z: torch.Tensor, *, fast: bool = False) -> torch.Tensor:
        """Stage-2 latent ``channel_proj(channel_ds(z) + z)``, returned in fp32. Computed in fp32 (stored vectors),
        or with ``fast`` under the encoder's bf16 autocast where it has one (re-ranking: 2.5x on a CPU with bf16
        units, 0.5 % relative)."""
        z = torch.as_tensor(z, dtype=torch.float32).to(self.device)
        with self._lock, (self._autocast() if fast else contextlib.nullcontext()):
            out = self.model.channel_proj(self.model.channel_ds(z) + z)
        return out.float().cpu()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Reconstruct ``(B, S, S[, S])`` pixels in [0, 1] from z (channel mean of the output)."""
        z = torch.as_tensor(z, dtype=torch.float32).to(self.device)
        if self.openvino is not None:  # 2-D on the CPU: the decoder runs where the encoder does
            with self._lock:
                out = self._openvino_decoder(tuple(z.shape[1:]))(z.contiguous())
        else:
            with self._lock, self._autocast():
                if self._needs_sliding_window(tuple(d * self.downsample for d in z.shape[2:])):
                    out = self._sliding_window(z, self.model.decode, roi=self.settings.model.volume_roi // self.downsample)
                else:
                    out = self.model.decode(z)
        image = out.float().mean(dim=1).add(1.0).div(2.0).clamp(0.0, 1.0)
        return image.cpu().numpy()

