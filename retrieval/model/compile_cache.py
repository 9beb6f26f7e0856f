"""torch.compile's caches kept with the data, so a second start of the same compiled encoder is warm.

A compiled encoder (``RETRIEVAL_COMPILE``: on for CUDA) spends its first start compiling: 63.6 s on
an H200 for the 384 encoder (docs/benchmarks.md). Inductor caches what it compiles in a temporary
folder of the machine (``/tmp/torchinductor_<user>``), which a new container or machine does not have.
:func:`compile_cache` keeps PyTorch's portable cache artifacts (``torch.compiler.save_cache_artifacts``:
compiled graphs, autotuning choices) in one file under the data directory instead, named by a digest
of everything that decides the compiled code, as the OpenVINO IR cache is: the next start with the same
weights, input size, batch, precision, PyTorch and device loads it before compiling, and inductor then
reuses the code instead of generating, compiling and autotuning it again.

The file is written once, atomically, after a start that compiled without it; a file that fails to
load (another PyTorch, a damaged file) is logged and ignored, and replaced by that start's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    """The artifacts file for ``key`` (JSON-serialisable: what decides the compiled code) plus PyTorch's version."""
    described = {**key, "torch": torch.__version__, "format": CACHE_FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"compiled-{digest}.bin"


@contextmanager
def compile_cache(path: Path) -> Iterator[str]:
    """Around the first calls of a ``torch.compile``d module: load ``path``'s artifacts before, save them after
    when there were none. Yields ``"warm"`` when artifacts were loaded, else ``"cold"``."""
    state = "cold"
    if path.exists():
        try:
            loaded = torch.compiler.load_cache_artifacts(path.read_bytes())  # None when it could not read them
        except Exception as exc:  # noqa: BLE001 - a cache never stops a start: compile without it
            loaded, reason = None, f"{type(exc).__name__}: {exc}"
        else:
            reason = "unreadable artifacts"
        if loaded is None:
            logger.warning("compile cache %s not loaded (%s); compiling afresh", path.name, reason)
        else:
            state = "warm"
    yield state
    if state == "warm":
        return
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    _write_atomically(path, artifacts[0])
    logger.info("compile cache written: %s (%.1f MB)", path, len(artifacts[0]) / 2**20)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
