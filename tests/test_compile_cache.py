"""Issue 18, item 3: a compiled encoder's next start reuses the compiled code kept in the data dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _compile_once(cache: Path | None) -> tuple[str, dict[str, int]]:
    """A fresh compile (dynamo's state reset) of a small module, with or without the compile cache file; returns
    its state and inductor's counters for this compile."""
    from torch._dynamo.utils import counters

    from retrieval.model.compile_cache import compile_cache

    torch._dynamo.reset()
    counters.clear()
    model = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU()))
    state = "none"
    if cache is None:
        model(torch.zeros(2, 8))
    else:
        with compile_cache(cache) as state:
            model(torch.zeros(2, 8))
    return state, dict(counters["inductor"])


def test_a_new_start_with_an_empty_inductor_cache_reuses_the_compiled_code_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "data" / "compile-cache" / "compiled-x.bin"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-1"))
    state, counted = _compile_once(cache)
    assert state == "cold" and counted.get("fxgraph_cache_miss", 0) >= 1 and cache.stat().st_size > 0
    # each later start has an empty inductor cache, as on a new machine or container
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-2"))
    _, counted = _compile_once(None)
    assert counted.get("fxgraph_cache_hit", 0) == 0, "without the file, nothing may be reused"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-3"))
    state, counted = _compile_once(cache)
    assert state == "warm" and counted.get("fxgraph_cache_hit", 0) >= 1 and counted.get("fxgraph_cache_miss", 0) == 0


def test_a_damaged_cache_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from retrieval.model.compile_cache import cache_path, compile_cache

    path = cache_path(tmp_path, {"model": "medvae_8_4_2d", "input_size": 384})
    assert path != cache_path(tmp_path, {"model": "medvae_8_4_2d", "input_size": 512})  # named by what decides the code
    path.write_bytes(b"not a cache")
    with compile_cache(path) as state:
        pass
    assert state == "cold" and "not loaded" in caplog.text
