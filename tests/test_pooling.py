from __future__ import annotations

import pytest
import torch

from retrieval.errors import ConfigurationError
from retrieval.model.pooling import parse_pooling, pool


@pytest.mark.parametrize(("spec", "dim"), [("mean", 4), ("spp:1,2,4", 84), ("spp:4,1,2", 84), ("grid:3", 36)])
def test_dimensions_and_normalisation(spec: str, dim: int) -> None:
    parsed = parse_pooling(spec)
    s2 = torch.randn(3, 4, 8, 8)
    vectors = pool(s2, parsed)
    assert vectors.shape == (3, dim) == (3, parsed.dimension(4))
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-6)


def test_spp_level_one_is_global_mean() -> None:
    s2 = torch.randn(1, 4, 8, 8)
    raw = torch.cat([s2.mean(dim=(2, 3)), torch.nn.functional.adaptive_avg_pool2d(s2, 2).flatten(1)], dim=1)
    assert torch.allclose(pool(s2, parse_pooling("spp:1,2")), raw / raw.norm(), atol=1e-6)


def test_canonical_form() -> None:
    assert parse_pooling(" spp:4,2,1,2 ").canonical == "spp:1,2,4"


@pytest.mark.parametrize("spec", ["", "max", "spp", "spp:a", "grid:1,2", "spp:0"])
def test_bad_specs_name_the_field(spec: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_pooling(spec)
    assert info.value.detail["field"] == "pooling"
