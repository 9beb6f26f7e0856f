"""Every supported architecture builds exactly the checkpoint layout it ships a manifest of, and that
layout's fp32 size is the hub checkpoint's (issue 13, item 6): a wrong architecture fails here, offline."""

from __future__ import annotations

import json

import pytest

from retrieval.domain.architectures import ARCHITECTURES
from retrieval.ops.checkpoint_manifests import HUB_CHECKPOINT_MB, MANIFEST_DIR, state_shapes


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_matches_its_manifest_and_the_hub_size(name: str) -> None:
    manifest = json.loads((MANIFEST_DIR / f"{name}.json").read_text())
    architecture = ARCHITECTURES[name]
    assert manifest["hub_checkpoint"] == architecture.hub_checkpoint
    assert state_shapes(architecture) == manifest["keys"]
    hub_bytes = HUB_CHECKPOINT_MB[name] * 1e6  # the hub sizes are whole MB: allow their rounding
    assert abs(manifest["fp32_bytes"] - hub_bytes) <= max(0.5e6, 0.002 * hub_bytes), (manifest["fp32_bytes"], hub_bytes)
    if architecture.dims == 3:  # the untrained stage-2 head that a 3-D checkpoint may omit is part of the layout
        assert any(key.startswith("channel_proj.") for key in manifest["keys"])
