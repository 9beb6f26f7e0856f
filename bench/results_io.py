"""Writing a benchmark's JSON result next to the others in ``bench/results/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(out_dir: str | Path, name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` as ``<out_dir>/<name>-<date>.json`` and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
