"""``retrieval demo``: the main job on the bundled sample set, for a first run on a fresh machine.

Weights: whatever ``RETRIEVAL_WEIGHTS`` says when it is set explicitly. Otherwise the hub weights
when the hub answers; when it does not, the demo says so plainly and runs with explicitly
labelled random-initialised weights (a pipeline demonstration, never presented as real).
"""

from __future__ import annotations

from retrieval.model.hub import hub_address, hub_reachable


def demo_weights(explicit: str | None) -> tuple[str, str | None]:
    """``(weights setting, notice)``: the notice explains a switch to random weights."""
    if explicit:
        return explicit, None
    if hub_reachable():
        return "hub", None
    return "random", (
        f"The Hugging Face hub ({hub_address()[0]}) is not reachable from this machine, so the real MedVAE weights "
        "cannot be downloaded. This demo therefore runs with RANDOM-INITIALISED weights of the exact "
        "medvae_8_4_2d architecture: the pipeline is real, the similarities are not clinically meaningful. "
        "Set RETRIEVAL_WEIGHTS=hub (online) or RETRIEVAL_WEIGHTS=/path/to/vae_8x_4c_2D.ckpt for real weights."
    )
