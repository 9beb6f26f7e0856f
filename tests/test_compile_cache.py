"""Issue 18, item 3: the compiled encoder is an AOTInductor package kept in the data dir; later starts load it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from retrieval.model.compile_cache import load_or_compile, package_path


def test_the_package_is_compiled_once_and_later_starts_load_it_without_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    module = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.SiLU()).eval()
    example = torch.randn(2, 2, 8, 8)
    with torch.inference_mode():
        expected = module(example)
    path = package_path(tmp_path / "compile-cache", {"model": "tiny", "input_size": 8, "batch_size": 2})
    assert path != package_path(tmp_path / "compile-cache", {"model": "tiny", "input_size": 16, "batch_size": 2})
    run, state = load_or_compile(module, example, path)
    assert state == "cold" and path.is_file() and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert torch.allclose(run(example), expected, atol=1e-5)

    def compiling(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a later start compiled again")

    with monkeypatch.context() as patched:  # a later start: loads the package, traces and compiles nothing
        patched.setattr(torch.export, "export", compiling)
        run, state = load_or_compile(module, example, path)
    assert state == "warm" and torch.allclose(run(example), expected, atol=1e-5)

    path.write_bytes(path.read_bytes()[:1000])  # damaged: logged, compiled again, replaced
    run, state = load_or_compile(module, example, path)
    assert state == "cold" and "not loaded" in caplog.text and torch.allclose(run(example), expected, atol=1e-5)
