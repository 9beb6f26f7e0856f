"""Run the `retrieval` command in tests: in this process (the default) or as a real process.

In-process runs go through Typer's CliRunner with the given environment, so a command costs
what it does, not ~3.5 s of interpreter start-up and torch import. A real process is kept where
the process itself is what a test is about (SIGKILL, `python -m retrieval` as a user types it,
serve and worker).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from typer.testing import CliRunner

from retrieval.cli import app


@dataclass(frozen=True)
class CliResult:
    """What a run of the command left: its exit status and its two output streams."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(env: dict[str, str], *args: str, check: bool = True) -> CliResult:
    """Run `retrieval ARGS` in this process with ``env`` as its environment.

    An exception the command did not turn into an exit status fails the test: as a process, it
    would have been a traceback on the user's terminal.
    """
    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"retrieval {' '.join(args)} raised {result.exception!r}\n{result.stderr}") from result.exception
    return _checked(CliResult(result.exit_code, result.stdout, result.stderr), args, check)


def run_cli_process(env: dict[str, str], *args: str, check: bool = True) -> CliResult:
    """Run `python -m retrieval ARGS` as a child process, exactly as a user would."""
    done = subprocess.run([sys.executable, "-m", "retrieval", *args], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    return _checked(CliResult(done.returncode, done.stdout, done.stderr), args, check)


def _checked(result: CliResult, args: tuple[str, ...], check: bool) -> CliResult:
    if check and result.returncode != 0:
        raise AssertionError(f"retrieval {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
