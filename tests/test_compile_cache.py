"""Issue 18, item 3: the compiled encoder is an AOTInductor package kept in the data dir; later starts load it."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_settings
from torch import nn

from retrieval.model import compile_cache, encoder
from retrieval.model.compile_cache import (
    keep_inductor_cache_beside,
    load_or_compile,
    package_path,
)
from retrieval.model.encoder import MedVAEEncoder
from retrieval.ops.doctor import diagnose

REAL_CHILD = compile_cache._child_command
ChildCommand = Callable[[str, list[str]], list[str]]


def _tiny_module() -> tuple[nn.Module, torch.Tensor]:
    """The same small module (weights included) and input at every call."""
    generator = torch.Generator().manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU()).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module, torch.randn(2, 2, 8, 8, generator=generator)


@dataclass
class FirstBuild:
    """The tiny module compiled for real, cold, once for this file (a build is about 15 s of C++ compilation)."""

    path: Path
    run: Callable[[torch.Tensor], torch.Tensor] | None
    state: str
    files: list[str]
    pristine: Path  # a copy of the package, outside its folder


@pytest.fixture(scope="module")
def first_build(tmp_path_factory: pytest.TempPathFactory) -> FirstBuild:
    module, example = _tiny_module()
    path = package_path(tmp_path_factory.mktemp("compile-cache"), {"model": "tiny", "input_size": 8, "batch_size": 2})
    run, state = load_or_compile(module, example, path)
    files = sorted(p.name for p in path.parent.iterdir())
    pristine = tmp_path_factory.mktemp("pristine") / path.name
    shutil.copyfile(path, pristine)
    return FirstBuild(path, run, state, files, pristine)


def _copying_build(pristine: Path) -> ChildCommand:
    """The child command, whose build writes the first build's package instead of compiling the same module again:
    for the tests of what happens around a build (the build child itself ran for real in ``first_build``)."""
    def command(which: str, arguments: list[str]) -> list[str]:
        if which == "build":
            return [sys.executable, "-c", "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])",
                    str(pristine), arguments[1]]
        return REAL_CHILD(which, arguments)
    return command


def test_the_package_is_compiled_once_and_later_starts_load_it_without_compiling(
    first_build: FirstBuild, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module, example = _tiny_module()
    with torch.inference_mode():
        expected = module(example)
    path = first_build.path
    assert path != package_path(path.parent, {"model": "tiny", "input_size": 16, "batch_size": 2})
    assert first_build.state == "cold" and first_build.run is not None
    assert first_build.files == [path.name, path.name + ".probe"]
    assert (path.parent / (path.name + ".probe")).read_text() == "ran\n"  # loaded and run in a child process first
    assert torch.allclose(first_build.run(example), expected, atol=1e-5)

    def compiling(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a later start compiled again")

    with monkeypatch.context() as patched:  # a later start: loads the package, traces and compiles nothing
        patched.setattr(torch.export, "export", compiling)
        run, state = load_or_compile(module, example, path)
    assert state == "warm" and torch.allclose(run(example), expected, atol=1e-5)

    path.write_bytes(path.read_bytes()[:1000])  # damaged: logged, built again, probed, replaced
    built: list[str] = []
    copying = _copying_build(first_build.pristine)
    monkeypatch.setattr(compile_cache, "_child_command", lambda which, arguments: built.append(which) or copying(which, arguments))
    run, state = load_or_compile(module, example, path)
    assert state == "cold" and "not loaded" in caplog.text and built == ["build", "probe"]
    assert torch.allclose(run(example), expected, atol=1e-5)




def _crashing(task: str, otherwise: ChildCommand = REAL_CHILD) -> ChildCommand:
    """The child command, whose ``task`` dies as the H200's load did (SIGSEGV, 2026-11-30)."""
    def command(which: str, arguments: list[str]) -> list[str]:
        if which == task:
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
        return otherwise(which, arguments)
    return command


def _never(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("a later start probed or compiled again")


def test_a_package_that_crashes_its_test_process_is_never_loaded_and_the_start_goes_on_uncompiled(
    tmp_path: Path, first_build: FirstBuild, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module, example = _tiny_module()
    path = package_path(tmp_path / "compile-cache", {"model": "tiny", "input_size": 8, "batch_size": 2})
    loaded: list[str] = []
    real_load = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda p: loaded.append(p) or real_load(p))
    with monkeypatch.context() as patched:
        patched.setattr(compile_cache, "_child_command", _crashing("probe", otherwise=_copying_build(first_build.pristine)))
        run, state = load_or_compile(module, example, path)
    assert (run, state) == (None, "unusable") and loaded == []  # built in a child, never loaded here
    assert path.is_file() and (path.parent / (path.name + ".probe")).read_text() == "crashed: SIGSEGV\n"
    assert "is not used: crashed: SIGSEGV" in caplog.text and str(path) in caplog.text

    with monkeypatch.context() as patched:  # a later start: the kept verdict, no second probe, no rebuild
        patched.setattr(compile_cache, "_child_command", _never)
        patched.setattr(torch.export, "export", _never)
        assert load_or_compile(module, example, path) == (None, "unusable") and loaded == []

    (path.parent / (path.name + ".probe")).unlink()  # the way to try again (after a PyTorch upgrade, say)
    run, state = load_or_compile(module, example, path)
    assert state == "warm" and loaded == [str(path)] and run is not None


def test_a_build_that_crashes_its_process_leaves_no_package_and_is_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1)).eval()
    example = torch.randn(2, 2, 8, 8)
    path = package_path(tmp_path / "compile-cache", {"model": "tiny", "input_size": 8, "batch_size": 2})
    with monkeypatch.context() as patched:
        patched.setattr(compile_cache, "_child_command", _crashing("build"))
        assert load_or_compile(module, example, path) == (None, "unusable")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name + ".probe"]  # no package, no temporary files
    assert (path.parent / (path.name + ".probe")).read_text() == "crashed: SIGSEGV while building\n"
    monkeypatch.setattr(compile_cache, "_child_command", _never)
    monkeypatch.setattr(torch.export, "export", _never)
    assert load_or_compile(module, example, path) == (None, "unusable")


def test_an_encoder_whose_package_is_unusable_encodes_uncompiled_the_same_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder, "load_or_compile", lambda *_args: (None, "unusable"))
    settings = tiny_settings(tmp_path, weights="random", compile="on", batch_size=2)
    compiled = MedVAEEncoder(settings)
    assert compiled.compile_cache == "unusable" and not compiled.compiled
    pixels = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)  # not a multiple of batch_size
    eager = MedVAEEncoder(tiny_settings(tmp_path, weights="random", compile="off", batch_size=2))
    assert torch.equal(compiled.encode(pixels), eager.encode(pixels))


def test_doctor_warns_when_the_compiled_encoder_is_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder, "load_or_compile", lambda *_args: (None, "unusable"))
    report = diagnose(tiny_settings(tmp_path, weights="random", compile="on", batch_size=2))
    assert report["weights"]["compiled"] == "unusable"
    assert any("compiled encoder crashed" in warning and "compile-cache" in warning for warning in report["warnings"])
    assert diagnose(tiny_settings(tmp_path, weights="random", compile="off"))["weights"]["compiled"] is None


def test_inductors_cache_is_kept_beside_the_package_unless_the_environment_names_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a CPU package compiles inductor's instruction-set probes into its cache (14 s on a 2-core CPU): kept with
    the data, a start on a fresh /tmp (a new container on the same volume) finds them."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = package_path(tmp_path / "compile-cache", {"model": "tiny", "input_size": 8, "batch_size": 2})
    children: dict[str, str] = {}  # task -> the inductor cache its child process was given

    def recorded(task: str, _arguments: list[str], _timeout: float, environment: dict[str, str] | None = None) -> str:
        children[task] = (environment or os.environ)["TORCHINDUCTOR_CACHE_DIR"]
        return "failed: only recorded"

    monkeypatch.setattr(compile_cache, "_in_child", recorded)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    keep_inductor_cache_beside(path)
    assert cache_dir() == str(tmp_path / "compile-cache" / "inductor")
    assert load_or_compile(*_tiny_module(), path) == (None, "unusable")
    build_cache = Path(children["build"])  # a temporary cache, gone with the build's folder: not the kept one
    assert build_cache.parent.parent == path.parent and build_cache.name == "inductor" and not build_cache.parent.exists()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "chosen"))
    keep_inductor_cache_beside(path)
    assert cache_dir() == str(tmp_path / "chosen")
    load_or_compile(*_tiny_module(), path)
    assert children["build"] == str(tmp_path / "chosen")  # the environment's choice, for the build as for the rest
