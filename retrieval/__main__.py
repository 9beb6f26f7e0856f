"""``python -m retrieval`` = the ``retrieval`` command."""

from retrieval.cli import app

app()
