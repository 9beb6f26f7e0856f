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

Building and trying a package happen in child processes, because native code there can kill the process
outright: on an H200 with torch 2.11.0+cu130, ``aoti_load_package`` died with SIGSEGV in the process that
had just built the package (2026-11-30), which took every GPU ingest and server start down with it. This
process only traces the model (``torch.export``) and, once a child has loaded and run the package
(:func:`probe_package`), loads it. The verdict is kept beside the package (``<package>.probe``), so each
child runs once per package: a package that ran is loaded directly at every later start; a build or a
package that crashed its child is never tried again, and the encoder runs uncompiled (``"unusable"``,
logged as a warning) until the ``.probe`` file is deleted, e.g. after a PyTorch upgrade.
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
BUILD_SECONDS = 3600
Runner = Callable[[torch.Tensor], Any]


def load_or_compile(module: nn.Module, example: torch.Tensor, path: Path) -> tuple[Runner | None, str]:
    """``module`` compiled for inputs shaped (and strided) like ``example``: loaded from ``path`` when a package is
    there (``"warm"``), else exported, compiled and written there first (``"cold"``). ``(None, "unusable")`` when
    building or trying the package crashed a child process, or the build failed: the caller runs ``module``."""
    keep_inductor_cache_beside(path)
    verdict = _kept_verdict(path)
    if path.exists() and not verdict.startswith("crashed"):
        verdict = verdict or _probe_and_keep(path, example)
        if verdict == "ran":
            try:
                return torch._inductor.aoti_load_package(str(path)), "warm"
            except Exception as exc:  # noqa: BLE001 - a damaged package never stops a start: build it again
                verdict = f"failed: {type(exc).__name__}: {exc}"
        if not verdict.startswith("crashed"):
            logger.warning("compiled package %s not loaded (%s); compiling afresh", path.name, verdict)
    if not verdict.startswith("crashed"):
        verdict = _build(module, example, path)
        if verdict == "ran":
            verdict = _probe_and_keep(path, example)
    if verdict == "ran":
        return torch._inductor.aoti_load_package(str(path)), "cold"
    logger.warning("the compiled encoder %s is not used: %s. Encoding uncompiled (slower, the same vectors)%s",
                   path, verdict, "; delete its .probe file to try again, e.g. after a PyTorch upgrade"
                   if verdict.startswith("crashed") else "")
    return None, "unusable"


def keep_inductor_cache_beside(path: Path) -> None:
    """Inductor's own cache (``TORCHINDUCTOR_CACHE_DIR``) in ``<package folder>/inductor``, unless the environment names
    one or inductor has already chosen one in this process; children inherit it.

    Loading a CPU package compiles inductor's instruction-set probes (ten small C++ files) into that cache:
    17.1 s for a warm start with an empty cache against 3.5 s with a kept one (2-core Xeon, 2026-11-30). Its default
    place is under /tmp, which a new container or machine on the same data starts without. The build child gets a
    temporary cache instead of this one (its files hold a second copy of the weights): :func:`_build`."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_inductor_cache(path)))


def _inductor_cache(path: Path) -> Path:
    return path.parent / "inductor"


def probe_package(path: Path, example: torch.Tensor) -> str:
    """Load ``path`` and run it once on zeros shaped, strided and placed like ``example``, in a child process:
    ``"ran"``, ``"crashed: <signal or timeout>"`` (the child died: loading it here would kill this process), or
    ``"failed: <error>"`` (it raised: a damaged or stale file, which a rebuild replaces)."""
    spec = {"shape": list(example.shape), "stride": list(example.stride()), "dtype": str(example.dtype).removeprefix("torch."),
            "device": str(example.device)}
    return _in_child("probe", [str(path), json.dumps(spec)], PROBE_SECONDS)


def _build(module: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Export ``module`` here, compile the package in a child process, and put it at ``path`` when that worked:
    the child's verdict (a crash is kept beside ``path``)."""
    logger.info("compiling the encoder ahead of time (once per weights, input size and batch)")
    with torch.inference_mode():
        exported = torch.export.export(module.eval(), (example,))
    path.parent.mkdir(parents=True, exist_ok=True)
    _verdict_file(path).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:
        program, pending = Path(folder) / "exported.pt2", Path(folder) / path.name
        torch.export.save(exported, program)
        # the build's own files (a copy of the weights among them) go with the temporary folder, not the cache kept
        # beside the package; an inductor cache that the environment chose gets them as inductor would put them there
        environment = dict(os.environ)
        if environment.get("TORCHINDUCTOR_CACHE_DIR") == str(_inductor_cache(path)):
            environment["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")
        verdict = _in_child("build", [str(program), str(pending)], BUILD_SECONDS, environment=environment)
        if verdict == "ran":
            os.replace(pending, path)
            logger.info("compiled package written: %s (%.0f MB)", path, path.stat().st_size / 2**20)
    if verdict.startswith("crashed"):
        _verdict_file(path).write_text(f"{verdict} while building\n")
        return f"{verdict} while building"
    return verdict


def _in_child(task: str, arguments: list[str], timeout: float, environment: dict[str, str] | None = None) -> str:
    """Run this module's ``task`` in a new Python process (in ``environment``, else this one's): ``"ran"``,
    ``"crashed: ..."`` or ``"failed: ..."``."""
    try:
        child = subprocess.run(_child_command(task, arguments), capture_output=True, text=True, timeout=timeout,
                               env=environment)
    except subprocess.TimeoutExpired:
        return f"crashed: no answer in {timeout:.0f} s"
    if child.returncode < 0:
        logger.warning("the child process (%s) died; the end of what it wrote:\n%s", task, child.stderr[-3000:])
        return f"crashed: {signal.Signals(-child.returncode).name}"
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        return f"failed: {last}"
    return "ran"


def _child_command(task: str, arguments: list[str]) -> list[str]:
    return [sys.executable, "-m", "retrieval.model.compile_cache", task, *arguments]


def _verdict_file(path: Path) -> Path:
    return path.with_name(path.name + ".probe")


def _kept_verdict(path: Path) -> str:
    record = _verdict_file(path)
    return record.read_text().strip() if record.exists() else ""


def _probe_and_keep(path: Path, example: torch.Tensor) -> str:
    """:func:`probe_package`, its verdict kept unless it failed (a failed package is rebuilt and probed afresh)."""
    verdict = probe_package(path, example)
    if not verdict.startswith("failed"):
        _verdict_file(path).write_text(verdict + "\n")
    return verdict


def _child_probe(path: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    runner = torch._inductor.aoti_load_package(path)
    x = torch.empty_strided(spec["shape"], spec["stride"], dtype=getattr(torch, spec["dtype"]), device=spec["device"])
    with torch.inference_mode():
        runner(x.zero_())
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def _child_build(program: str, package: str) -> None:
    torch._inductor.aoti_compile_and_package(torch.export.load(program), package_path=package)


if __name__ == "__main__":
    {"probe": _child_probe, "build": _child_build}[sys.argv[1]](*sys.argv[2:4])
