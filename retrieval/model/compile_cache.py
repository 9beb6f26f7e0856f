"""The compiled encoder as an AOTInductor package kept with the data: compiled once, loaded at every later start.

``RETRIEVAL_COMPILE`` (on for CUDA) compiles the 2-D encoder's posterior mode with inductor. Compiled
just in time (``torch.compile``), every process start paid for it again: 63.6 s on an H200, 108 s on
the 2-core CPU here, and PyTorch's portable cache artifacts only spared the C++/Triton compilation
(92.7 s warm: dynamo's tracing and inductor's lowering ran again; docs/benchmarks.md). Compiled ahead
of time instead (``torch.export`` + ``torch._inductor.aoti_compile_and_package``), the result is one
``.pt2`` file holding the generated code and the weights, which a later start loads without tracing
anything: 0.14 s for the 384 encoder on that CPU, against 36 s to build it.

:func:`load_or_compile` keeps the package at ``<data dir>/compile-cache/encoder-<digest>.pt2``, named
by a digest of everything that decides the compiled code (model, weights, device, input size, batch,
precision, memory layout, PyTorch), as the OpenVINO IR cache is. The package is written to a
temporary name and renamed, so a killed build leaves no half file under the real name; a package
that fails to load (a damaged file) is logged and rebuilt.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.model.cache_files import cache_file

logger = logging.getLogger(__name__)

PACKAGE_FORMAT_VERSION = "1"  # bump when what is exported changes


def package_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    """The package file for ``key`` (JSON-serialisable: what decides the compiled code) plus PyTorch's version."""
    return cache_file(cache_dir, "encoder", {**key, "torch": torch.__version__, "format": PACKAGE_FORMAT_VERSION}, ".pt2")


def load_or_compile(module: nn.Module, example: torch.Tensor, path: Path) -> tuple[Callable[[torch.Tensor], Any], str]:
    """``module`` compiled for inputs shaped (and strided) like ``example``: loaded from ``path`` when a package is
    there (``"warm"``), else exported, compiled and written there first (``"cold"``)."""
    if path.exists():
        try:
            return torch._inductor.aoti_load_package(str(path)), "warm"
        except Exception as exc:  # noqa: BLE001 - a damaged package never stops a start: build it again
            logger.warning("compiled package %s not loaded (%s: %s); compiling afresh", path.name, type(exc).__name__, exc)
    logger.info("compiling the encoder ahead of time (once per weights, input size and batch)")
    with torch.inference_mode():
        exported = torch.export.export(module.eval(), (example,))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        pending = Path(folder) / path.name
        torch._inductor.aoti_compile_and_package(exported, package_path=str(pending))
        os.replace(pending, path)
    logger.info("compiled package written: %s (%.0f MB)", path, path.stat().st_size / 2**20)
    return torch._inductor.aoti_load_package(str(path)), "cold"
