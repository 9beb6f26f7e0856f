"""Names of the files a model runtime derives once and keeps under the data dir (OpenVINO IR, compiled packages).

A derived file is named by a digest of everything that decides its content, so a change of any of it
(weights, input shape, runtime version, format) names another file instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def cache_file(directory: Path, stem: str, key: dict[str, Any], suffix: str) -> Path:
    """``<directory>/<stem>-<digest><suffix>``, the digest (24 hex digits of sha256) over ``key`` as sorted JSON."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return directory / f"{stem}-{digest}{suffix}"
