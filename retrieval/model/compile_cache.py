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

A package is first loaded and run once in a child process (:func:`probe_package`), because loading one can
crash the process outright: on an H200 with torch 2.11.0+cu130 ``aoti_load_package`` died with SIGSEGV
(2026-11-30), which took every GPU ingest and server start down with it. The verdict is kept beside the
package (``<package>.probe``), so the child runs once per package: a package that ran is loaded directly
at every later start; one that crashed its child is never loaded, and the encoder runs uncompiled
(``"unusable"``, logged as a warning) until the file is deleted, e.g. after a PyTorch upgrade.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
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


PROBE_SECONDS = 600  # a load and one run that take longer than this would hang the service too
Runner = Callable[[torch.Tensor], Any]


def load_or_compile(module: nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner | None, str]:
    """``module`` compiled for inputs shaped (and strided) like ``example``: loaded from ``path`` when a package is
    there (``"warm"``), else exported, compiled and written there first (``"cold"``). ``(None, "unusable")`` when
    the package crashed the child process that tried it (:func:`probe_package`): the caller runs ``module``."""
    if path.exists():
        verdict = _probe_verdict(path, example)
        if verdict.startswith("crashed"):
            return None, "unusable"
        if verdict == "ran":
            try:
                return torch._inductor.aoti_load_package(str(path)), "warm"
            except Exception as exc:  # noqa: BLE001 - a damaged package never stops a start: build it again
                logger.warning("compiled package %s not loaded (%s: %s); compiling afresh", path.name, type(exc).__name__, exc)
        else:
            logger.warning("compiled package %s not loaded (%s); compiling afresh", path.name, verdict)
    logger.info("compiling the encoder ahead of time (once per weights, input size and batch)")
    with torch.inference_mode():
        exported = torch.export.export(module.eval(), (example,))
    path.parent.mkdir(parents=True, exist_ok=True)
    _verdict_file(path).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        pending = Path(folder) / path.name
        torch._inductor.aoti_compile_and_package(exported, package_path=str(pending))
        os.replace(pending, path)
    logger.info("compiled package written: %s (%.0f MB)", path, path.stat().st_size / 2**20)
    if _probe_verdict(path, example).startswith("crashed"):
        return None, "unusable"
    return torch._inductor.aoti_load_package(str(path)), "cold"


def probe_package(path: Path, example: torch.Tensor) -> str:
    """Load ``path`` and run it once on zeros shaped, strided and placed like ``example``, in a child process:
    ``"ran"``, ``"crashed: <signal or timeout>"`` (the child died: loading it here would kill this process), or
    ``"failed: <error>"`` (it raised: a damaged or stale file, which a rebuild replaces)."""
    spec = {"shape": list(example.shape), "stride": list(example.stride()), "dtype": str(example.dtype).removeprefix("torch."),
            "device": str(example.device)}
    try:
        child = subprocess.run(_probe_command(path, spec), capture_output=True, text=True, timeout=PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return f"crashed: no answer in {PROBE_SECONDS} s"
    if child.returncode < 0:
        logger.warning("the test process loading %s died; the end of what it wrote:\n%s", path.name, child.stderr[-3000:])
        return f"crashed: {signal.Signals(-child.returncode).name}"
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["exit status " + str(child.returncode)])[-1]
        return f"failed: {last}"
    return "ran"


def _probe_command(path: Path, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "retrieval.model.compile_cache", str(path), json.dumps(spec)]


def _verdict_file(path: Path) -> Path:
    return path.with_name(path.name + ".probe")


def _probe_verdict(path: Path, example: torch.Tensor) -> str:
    """The kept verdict on ``path``, probing it first when none is kept; a crash is logged every time."""
    record = _verdict_file(path)
    verdict = record.read_text().strip() if record.exists() else ""
    if not verdict:
        verdict = probe_package(path, example)
        if not verdict.startswith("failed"):  # a failure is rebuilt, and the rebuilt file probed afresh
            record.write_text(verdict + "\n")
    if verdict.startswith("crashed"):
        logger.warning(
            "the compiled encoder %s is not loaded: a test process that loaded it %s; encoding uncompiled (slower, "
            "the same vectors). Delete it and its .probe file to try again, e.g. after a PyTorch upgrade",
            path, verdict)
    return verdict


def _run_probe(path: str, spec_json: str) -> None:
    """The child of :func:`probe_package`."""
    spec = json.loads(spec_json)
    runner = torch._inductor.aoti_load_package(path)
    x = torch.empty_strided(spec["shape"], spec["stride"], dtype=getattr(torch, spec["dtype"]), device=spec["device"])
    with torch.inference_mode():
        runner(x.zero_())
    if x.device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    _run_probe(*sys.argv[1:3])
