"""What every command shares: the Typer app, consoles, settings with the global options, error output.

Heavy modules (torch, the model, SQLAlchemy models) are imported inside the commands, so
``retrieval --help`` and light commands start in well under a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.markup import escape

from retrieval.config import ENV_PREFIX, FLAT_NAMES, Settings
from retrieval.errors import RetrievalError
from retrieval.model.clip_weights import CLIP_HEAD, clip_setting_warnings
from retrieval.model.weights import weights_warning

app = typer.Typer(help="Similar-case search for radiology archives on MedVAE latents.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


DEMO_INPUT_SIZE = 256


class State:
    settings_overrides: dict[str, Any] = {}


def settings() -> Settings:
    """Settings from the environment / .env, with the global CLI options applied."""
    try:
        return Settings(**State.settings_overrides)
    except ValidationError as exc:  # every command exits 2 naming the environment variable (or option) at fault
        raise fail(RetrievalError(f"invalid settings: {settings_error_message(exc)}"), as_json=False) from None


SENSITIVE = re.compile(r"url|secret|password|token|keys")
ENV_NAMES: dict[tuple[str, str], str] = {place: f"{ENV_PREFIX}{flat.upper()}" for flat, place in FLAT_NAMES.items()}
"""(group, field) -> its environment name, for messages."""


def settings_error_message(exc: ValidationError) -> str:
    """One line per bad setting, named as the user set it: ``RETRIEVAL_INPUT_SIZE (model.input_size): …``."""
    lines = []
    for error in exc.errors(include_url=False):
        place = tuple(str(part) for part in error["loc"][:2])
        name = ENV_NAMES.get(place) if len(place) == 2 else None  # type: ignore[call-overload]
        message = error["msg"].removeprefix("Value error, ")
        if not place:  # a rule across settings: its message names them
            lines.append(message)
            continue
        where = f"{name} ({'.'.join(place)})" if name else ".".join(place)
        shown = name and not isinstance(error["input"], dict | SecretStr) and not SENSITIVE.search(place[1])
        given = f" (got {error['input']!r})" if shown else ""  # never echo a URL (it may hold a password) or a key
        lines.append(f"{where}: {message}{given}")
    return "; ".join(lines)


def warn_if_random(current: Settings) -> list[str]:
    """Say, before anything else, when MedVAE's weights (or, for a ``biomedclip`` space, BiomedCLIP's or its
    tokenizer) are not the trained ones. Settings alone decide it: nothing is loaded."""
    warnings = [weights_warning(current.model.weights)]
    poolings = [current.model.pooling, *current.model.extra_pooling_list]
    if any(pooling.strip().startswith(CLIP_HEAD) for pooling in poolings):
        warnings += clip_setting_warnings(current.clip)
    said = [warning for warning in warnings if warning]
    for warning in said:
        err.print(f"[bold yellow]{escape(warning)}[/]")
    return said


def fail(exc: RetrievalError, *, as_json: bool) -> typer.Exit:
    if as_json:
        out.print_json(json.dumps(exc.to_dict()))
    else:
        err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
    return typer.Exit(code=2)


@contextlib.contextmanager
def reported_errors(*, as_json: bool = False) -> Iterator[None]:
    """Turn a :class:`RetrievalError` into the CLI's error output and exit status 2."""
    try:
        yield
    except RetrievalError as exc:
        raise fail(exc, as_json=as_json) from None


def model_settings() -> Settings:
    """Settings for a command that loads the model: warns first when the weights are random."""
    current = settings()
    warn_if_random(current)
    return current


@app.callback()
def main(
    data_dir: Annotated[Optional[Path], typer.Option(help="Data directory [RETRIEVAL_DATA_DIR].")] = None,
    database_url: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL [RETRIEVAL_DATABASE_URL].")] = None,
    model: Annotated[Optional[str], typer.Option(help="MedVAE model [RETRIEVAL_MODEL].")] = None,
    weights: Annotated[Optional[str], typer.Option(help="hub | random | checkpoint path [RETRIEVAL_WEIGHTS].")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for random weights [RETRIEVAL_SEED].")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Model input size [RETRIEVAL_INPUT_SIZE].")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda [RETRIEVAL_DEVICE].")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 [RETRIEVAL_PRECISION].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Encoder batch size [RETRIEVAL_BATCH_SIZE].")] = None,
    decode_workers: Annotated[Optional[int], typer.Option(help="Decode processes [RETRIEVAL_DECODE_WORKERS].")] = None,
    pooling: Annotated[Optional[str], typer.Option(help="Pooling spec [RETRIEVAL_POOLING].")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    """Global options; every one of them can also be set in the environment or a .env file."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    given = {
        "data_dir": data_dir, "database_url": database_url, "model": model, "weights": weights, "seed": seed,
        "input_size": input_size, "device": device, "precision": precision, "batch_size": batch_size,
        "decode_workers": decode_workers, "pooling": pooling,
    }
    State.settings_overrides = {key: value for key, value in given.items() if value is not None}


def service_for(current: Settings, *, space: str | None = None) -> Any:
    """The :class:`~retrieval.service.SpaceService` of the configured space, or of another stored space of the
    archive named by ``space`` (its key or 8+ characters; ``--space``)."""
    from retrieval.service import SpaceService

    service = SpaceService(current)
    if not space:
        return service
    from retrieval.spaces import SpaceServices

    return SpaceServices(service).get(space)
