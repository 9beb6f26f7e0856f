"""The 2-D encoder's posterior mode run by OpenVINO on the CPU (the same weights as the torch module).

Measured on a 2-core AMD EPYC with AVX512-BF16 (``bench/runtimes.py``, docs/benchmarks.md):
1.3x PyTorch's bf16 autocast in bf16, 1.4x PyTorch fp32 in f32; outputs equal PyTorch fp32
within 1e-5 relative (f32) and within bf16 tolerance (bf16, 2.5e-2 as autocast's 2.2e-2). So ``RETRIEVAL_RUNTIME=auto`` uses it
for CPU encoding when the package is installed.

Contract: :class:`OpenVinoPosteriorMode` takes the model input ``(B, C, S, S)`` (any B) and
returns the posterior mean ``(B, embed_dim, S/f, S/f)`` float32, deterministically. Converting the
torch module costs about 10 s at 384, so the converted model is kept as OpenVINO IR under
``cache_dir``, named by a digest of everything that determines it (weights identity, input size,
architecture, OpenVINO version); later loads read it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

IR_FORMAT_VERSION = "1"  # bump when PosteriorMode's graph changes


class PosteriorMode(nn.Module):
    """``encoder -> quant_conv -> mean half of the moments``: what the encoder's ``encode`` returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder, self.quant_conv = model.encoder, model.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)[0]


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoPosteriorMode:
    """A compiled OpenVINO model of :class:`PosteriorMode` with a dynamic batch dimension."""

    def __init__(self, model: nn.Module, *, in_channels: int, input_size: int, identity: str, bf16: bool,
                 threads: int, cache_dir: Path) -> None:
        import openvino as ov

        self.precision = "bf16" if bf16 else "f32"
        core = ov.Core()
        digest = hashlib.sha256(json.dumps({
            "identity": identity, "input_size": input_size, "in_channels": in_channels,
            "openvino": ov.__version__, "format": IR_FORMAT_VERSION,
        }, sort_keys=True).encode()).hexdigest()[:24]
        ir_path = cache_dir / f"encoder-{digest}.xml"
        if ir_path.exists() and ir_path.with_suffix(".bin").exists():
            ov_model = core.read_model(str(ir_path))
        else:
            ov_model = self._convert(model, in_channels, input_size)
            self._save(ov_model, ir_path)
        self.compiled = core.compile_model(ov_model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY",  # one stream using every thread: fastest per batch on few cores
            "INFERENCE_NUM_THREADS": threads,
        })
        self.request = self.compiled.create_infer_request()

    @staticmethod
    def _convert(model: nn.Module, in_channels: int, input_size: int):  # noqa: ANN205 - an ov.Model
        import openvino as ov

        logger.info("converting the encoder to OpenVINO (once per weights and input size; about 10 s at 384)")
        example = torch.zeros(1, in_channels, input_size, input_size)
        with torch.no_grad(), warnings.catch_warnings():
            # tracing notes that shapes become constants: intended (fixed input size; batch made dynamic below)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            ov_model = ov.convert_model(PosteriorMode(model).eval(), example_input=example)
        ov_model.reshape([-1, in_channels, input_size, input_size])
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
        """Posterior mean of a float32 NCHW batch on the CPU, one image per inference: with one
        latency stream over all threads that is the fastest per image (batch 4: 12 % slower)."""
        batch = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        outputs = [np.array(self.request.infer({0: batch[i : i + 1]})[0], dtype=np.float32, copy=True)
                   for i in range(len(batch))]
        return torch.from_numpy(np.concatenate(outputs))
