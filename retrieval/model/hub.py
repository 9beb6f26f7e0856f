"""Whether the Hugging Face hub can be reached from here, found out in seconds rather than retries.

``huggingface_hub`` retries an unreachable host for about half a minute, logging each attempt.
One TCP connection with a short timeout tells the same at once, so a first run offline gets one
clear sentence instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

CONNECT_SECONDS = 3.0


def hub_address() -> tuple[str, int]:
    """``(host, port)`` of the hub this process would use (``HF_ENDPOINT`` or huggingface.co)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)


def hub_reachable(timeout: float = CONNECT_SECONDS) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds (never with ``HF_HUB_OFFLINE=1``)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(hub_address(), timeout=timeout):
            return True
    except OSError:
        return False
