"""The 2-D encoder's posterior mode, and its decoder, run by OpenVINO on the CPU (the same weights as the torch module).

Measured on a 2-core AMD EPYC with AVX512-BF16 (``bench/runtimes.py``, docs/benchmarks.md):
1.3x PyTorch's bf16 autocast in bf16, 1.4x PyTorch fp32 in f32; outputs equal PyTorch fp32
within 1e-5 relative (f32) and within bf16 tolerance (bf16, 2.5e-2 as autocast's 2.2e-2). So ``RETRIEVAL_RUNTIME=auto`` uses it
for CPU encoding when the package is installed.

Contract: :class:`OpenVinoModule` runs one torch module with a fixed per-item shape and any
batch size, deterministically, float32 out: :class:`PosteriorMode` (model input ``(B, C, S, S)``
-> posterior mean ``(B, embed_dim, S/f, S/f)``) for encoding, :class:`Decode` (z -> the decoder's
output) for previews. Converting a module costs about 10 s at 384, so the converted model is kept
as OpenVINO IR under ``cache_dir``, named by a digest of everything that determines it (module,
weights identity, shape, OpenVINO version); later loads read it in milliseconds.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retrieval.model.cache_files import cache_file

logger = logging.getLogger(__name__)

IR_FORMAT_VERSION = "1"  # bump when PosteriorMode's graph changes


class PosteriorMode(nn.Module):
    """``encoder -> quant_conv -> mean half of the moments``: what the encoder's ``encode`` returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder, self.quant_conv = model.encoder, model.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)[0]


class Decode(nn.Module):
    """``post_quant_conv -> decoder``: what the model's ``decode`` returns for a latent z."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.model.decode(z)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoModule:
    """A compiled OpenVINO model of a torch module (``name`` names it: ``encoder``, ``decoder``), dynamic batch."""

    def __init__(self, module: nn.Module, *, name: str, item_shape: tuple[int, ...], identity: str, bf16: bool,
                 threads: int, cache_dir: Path) -> None:
        import openvino as ov

        self.precision = "bf16" if bf16 else "f32"
        core = ov.Core()
        ir_path = cache_file(cache_dir, name, {
            "identity": identity, "shape": list(item_shape), "module": name,
            "openvino": ov.__version__, "format": IR_FORMAT_VERSION,
        }, ".xml")
        if ir_path.exists() and ir_path.with_suffix(".bin").exists():
            ov_model = core.read_model(str(ir_path))
        else:
            ov_model = self._convert(module, name, item_shape)
            self._save(ov_model, ir_path)
        self.compiled = core.compile_model(ov_model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",  # one stream using every thread: fastest per batch on few cores
            "INFERENCE_NUM_THREADS": threads,
        })
        self.request = self.compiled.create_infer_request()

    @staticmethod
    def _convert(module: nn.Module, name: str, item_shape: tuple[int, ...]):  # noqa: ANN205 - an ov.Model
        import openvino as ov

        logger.info("converting the %s to OpenVINO (once per weights and input size; about 10 s at 384)", name)
        example = torch.zeros(1, *item_shape)
        with torch.no_grad(), warnings.catch_warnings():
            # tracing notes that shapes become constants: intended (fixed input size; batch made dynamic below)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            ov_model = ov.convert_model(module.eval(), example_input=example)
        ov_model.reshape([-1, *item_shape])
        return ov_model

    @staticmethod
    def _save(ov_model, ir_path: Path) -> None:  # noqa: ANN001
        """Write the IR pair atomically (temp names, then rename: .bin first, the .xml marks it complete)."""
        import openvino as ov

        ir_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ir_path.parent) as folder:
            tmp_xml = Path(folder) / ir_path.name
            ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
            os.replace(tmp_xml.with_suffix(".bin"), ir_path.with_suffix(".bin"))
            os.replace(tmp_xml, ir_path)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for a float32 batch on the CPU, one item per inference: with one
        latency stream over all threads that is the fastest per item (batch 4: 12 % slower)."""
        batch = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        outputs = [np.array(self.request.infer({0: batch[i : i + 1]})[0], dtype=np.float32, copy=True)
                   for i in range(len(batch))]
        return torch.from_numpy(np.concatenate(outputs))
