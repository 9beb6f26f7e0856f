"""The one way to get an encoder from settings: MedVAE (hub, checkpoint or random weights) or the fake."""

from __future__ import annotations

from retrieval.config import Settings
from retrieval.model.contract import Encoder


def load_encoder(settings: Settings) -> Encoder:
    """The configured encoder; ``weights=fake`` (explicit, never a fallback) gives the test stand-in."""
    if settings.model.weights == "fake":
        from retrieval.model.fake import FakeEncoder

        return FakeEncoder(settings)
    from retrieval.model.encoder import MedVAEEncoder

    return MedVAEEncoder(settings)
