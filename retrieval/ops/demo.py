"""``retrieval demo``: the main job on the bundled sample set, for a first run on a fresh machine.

Weights: whatever ``RETRIEVAL_WEIGHTS`` says when it is set explicitly. Otherwise the hub weights
when the hub answers; when it does not, the demo says so plainly and runs with explicitly
labelled random-initialised weights (a pipeline demonstration, never presented as real).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUB_HOST = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def demo_weights(explicit: str | None) -> tuple[str, str | None]:
    """``(weights setting, notice)``: the notice explains a switch to random weights."""
    if explicit:
        return explicit, None
    if hub_reachable():
        return "hub", None
    return "random", (
        f"The Hugging Face hub ({HUB_HOST}) is not reachable from this machine, so the real MedVAE weights "
        "cannot be downloaded. This demo therefore runs with RANDOM-INITIALISED weights of the exact "
        "medvae_8_4_2d architecture: the pipeline is real, the similarities are not clinically meaningful. "
        "Set RETRIEVAL_WEIGHTS=hub (online) or RETRIEVAL_WEIGHTS=/path/to/vae_8x_4c_2D.ckpt for real weights."
    )
