"""The ``retrieval`` command line (Typer). Global options override ``RETRIEVAL_*`` settings.

Output conventions: human-readable text on stdout, progress and warnings on stderr, ``--json``
prints one JSON document on stdout. Exit status 0 on success, 1 for ``ingest --strict`` with
failures, 2 for an error (printed as ``error: ...`` or, with ``--json``, the JSON error shape).
"""

from __future__ import annotations

import importlib

from retrieval.cli.common import app

# each module registers its commands on import; this order is the order of `retrieval --help`
for _module in ("ingest", "search", "archive", "evaluate", "serve"):
    importlib.import_module(f"retrieval.cli.{_module}")

__all__ = ["app"]
