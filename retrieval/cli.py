"""The ``retrieval`` command line (Typer). Global options override ``RETRIEVAL_*`` settings.

Output conventions: human-readable text on stdout, progress and warnings on stderr, ``--json``
prints one JSON document on stdout. Exit status 0 on success, 1 for ``ingest --strict`` with
failures, 2 for an error (printed as ``error: ...`` or, with ``--json``, the JSON error shape).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from retrieval.errors import RetrievalError
from retrieval.settings import Settings
from retrieval.weights import RANDOM_WEIGHTS_WARNING

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
    except Exception as exc:  # pydantic's ValidationError names the field
        raise RetrievalError(f"invalid settings: {exc}") from exc


def warn_if_random(current: Settings) -> None:
    if current.uses_random_weights:
        err.print(f"[bold yellow]{RANDOM_WEIGHTS_WARNING}[/]")


def fail(exc: RetrievalError, *, as_json: bool) -> typer.Exit:
    if as_json:
        out.print_json(json.dumps(exc.to_dict()))
    else:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
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


def _service(current: Settings) -> Any:
    from retrieval.service import RetrievalService

    return RetrievalService(current)


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Folder (recursive) or CSV manifest with a `path` column.")],
    strict: Annotated[bool, typer.Option(help="Exit with status 1 when any file failed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
) -> None:
    """Encode and store every new image of SOURCE; already stored images are skipped."""
    from retrieval.ingest import IngestPipeline

    current = settings()
    warn_if_random(current)
    try:
        service = _service(current)
        with Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err, disable=not show_progress,
            transient=False,
        ) as progress:
            task = progress.add_task("ingest", total=None, rate="")

            def on_progress(report: Any) -> None:
                done = report.ingested + report.skipped + report.failed
                progress.update(task, total=report.total or None, completed=done, rate=f"{report.images_per_second_live():.2f} img/s")

            pipeline = IngestPipeline(service, progress=on_progress)
            report = pipeline.run(source)
        service.close()
    except RetrievalError as exc:
        raise fail(exc, as_json=as_json) from None
    if as_json:
        payload = {"model": service.model_info(), "space": service.space_info(), **report.as_dict()}
        out.print_json(json.dumps(payload))
    else:
        for failure in report.failures:
            out.print(f"failed [{failure.stage}] {failure.source}: {failure.reason}", highlight=False, markup=False)
        out.print(report.summary(), highlight=False)
        if report.ingested:
            out.print(f"{report.images_per_second:.2f} images/s end to end ({report.seconds['wall']:.1f}s)", highlight=False)
    if strict and report.failed:
        raise typer.Exit(code=1)


@app.command()
def search(
    image: Annotated[Optional[Path], typer.Argument(help="Query image file (PNG, JPEG, DICOM, ...).")] = None,
    image_id: Annotated[Optional[int], typer.Option(help="Query with an image already in the archive.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Number of studies (or images).")] = 10,
    filters: Annotated[Optional[list[str]], typer.Option("--filter", help="key=value: modality, body_part, view, laterality, label, date_from, date_to, min_score.")] = None,
    group_by: Annotated[str, typer.Option(help="study | image")] = "study",
    exclude_same_patient: Annotated[bool, typer.Option(help="Drop images of the query's patient (needs --image-id or a DICOM query).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Find the studies most similar to IMAGE (or to --image-id)."""
    from retrieval.search import run_search

    current = settings()
    warn_if_random(current)
    try:
        if (image is None) == (image_id is None):
            from retrieval.errors import InvalidRequestError

            raise InvalidRequestError("give exactly one of IMAGE or --image-id", detail={"field": "image"})
        if group_by not in ("study", "image"):
            from retrieval.errors import InvalidRequestError

            raise InvalidRequestError("--group-by must be `study` or `image`", detail={"field": "group_by"})
        service = _service(current)
        payload = run_search(
            service, path=image, image_id=image_id, k=k, filter_pairs=filters or [], group_by=group_by,
            exclude_same_patient=exclude_same_patient,
        )
    except RetrievalError as exc:
        raise fail(exc, as_json=as_json) from None
    if as_json:
        out.print_json(json.dumps(payload))
        return
    _print_results(payload)


def _print_results(payload: dict[str, Any]) -> None:
    for warning in payload.get("warnings", []):
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if not payload["results"]:
        out.print("no results")
    for rank, result in enumerate(payload["results"], start=1):
        study = result["study"]
        out.print(f"{rank:>3}. score {result['score']:.4f}  study {study['study_id']} ({study['label']})", highlight=False)
        for image in result["images"]:
            out.print(f"       image {image['image_id']:>6}  {image['score']:.4f}  {image['source']}", highlight=False, markup=False)


@app.command()
def reindex(
    pooling: Annotated[Optional[str], typer.Option("--to-pooling", help="Build a space with this pooling from stored z.")] = None,
) -> None:
    """Rebuild the index from stored vectors, or (with --to-pooling) derive a new space from stored z."""
    from retrieval.pooling import parse_pooling
    from retrieval.reindex import reindex as run_reindex

    with reported_errors():
        report = run_reindex(_service(model_settings()), pooling=parse_pooling(pooling) if pooling else None)
    out.print(
        f"space {report.space_key[:12]} (pooling {report.pooling}): {report.vectors_added} vectors derived from stored z, "
        f"index holds {report.index_count}",
        highlight=False,
    )
    if pooling:
        out.print(f"search it with RETRIEVAL_POOLING={report.pooling} (or --pooling {report.pooling})", highlight=False)


@app.command()
def export(out_dir: Annotated[Path, typer.Argument(help="Output folder for .npz shards, metadata.csv, manifest.json.")]) -> None:
    """Export stored latents (z), vectors and metadata for downstream models."""
    from retrieval.export import export_latents

    with reported_errors():
        manifest = export_latents(_service(model_settings()), out_dir)
    out.print(f"exported {manifest['images']} images in {len(manifest['shards'])} shard(s) to {out_dir}", highlight=False)


@app.command()
def preview(
    image_id: Annotated[int, typer.Argument(help="Stored image id.")],
    output: Annotated[Path, typer.Argument(help="PNG file to write.")],
) -> None:
    """Write the MedVAE reconstruction of a stored image (decoded from its stored z) as PNG."""
    from retrieval.previews import preview_png

    with reported_errors():
        data = preview_png(_service(model_settings()), image_id)
    output.write_bytes(data)
    out.print(f"wrote {output} (MedVAE reconstruction from the stored latent, not the original pixels)", highlight=False)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    no_model: Annotated[bool, typer.Option("--no-model", help="Skip loading the model.")] = False,
) -> None:
    """Environment, weights, database and index state."""
    from retrieval.doctor import diagnose

    report = diagnose(model_settings(), load_model=not no_model)
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    for section, value in report.items():
        if isinstance(value, dict):
            out.print(f"[bold]{section}[/]")
            for key, item in value.items():
                out.print(f"  {key}: {item}", highlight=False, markup=False)
        else:
            out.print(f"[bold]{section}[/]: {value}", highlight=False)


@app.command()
def sample(target: Annotated[Path, typer.Argument(help="Folder to write the sample archive into.")] = Path("data/sample")) -> None:
    """Write the bundled sample archive (pydicom test files + generated chest X-ray look-alikes)."""
    from retrieval.sample import write_sample_set

    write_sample_set(target)
    out.print(f"sample archive written to {target}", highlight=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the HTTP API (OpenAPI docs at /docs) with uvicorn."""
    import uvicorn

    from api.main import create_app

    current = model_settings()
    out.print(f"serving on http://{host}:{port} (OpenAPI docs at /docs)", highlight=False)
    uvicorn.run(create_app(current), host=host, port=port, log_level="info")


@app.command()
def demo(
    k: Annotated[int, typer.Option("-k", help="Studies to show for the demo query.")] = 3,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Then serve the API on 127.0.0.1:8000.")] = True,
    port: Annotated[int, typer.Option(help="Port for --serve.")] = 8000,
) -> None:
    """Write the sample archive, ingest it, run a similar-case search, then serve the API."""
    import os

    from retrieval.demo import demo_weights
    from retrieval.ingest import IngestPipeline
    from retrieval.sample import write_sample_set
    from retrieval.search import run_search

    explicit = State.settings_overrides.get("weights") or os.environ.get("RETRIEVAL_WEIGHTS")
    weights, notice = demo_weights(explicit)
    if notice:
        err.print(f"[bold yellow]{notice}[/]")
    State.settings_overrides["weights"] = weights
    if "input_size" not in State.settings_overrides and not os.environ.get("RETRIEVAL_INPUT_SIZE"):
        State.settings_overrides["input_size"] = DEMO_INPUT_SIZE
        err.print(
            f"demo: input size {DEMO_INPUT_SIZE} (about half the CPU time of the default 384); "
            f"to query this archive later pass --input-size {DEMO_INPUT_SIZE} or set RETRIEVAL_INPUT_SIZE."
        )
    current = settings()
    warn_if_random(current)
    sample_dir = current.data_dir / "sample"
    write_sample_set(sample_dir, studies=4, images_per_study=2)
    out.print(f"sample archive: {sample_dir} (synthetic chest X-ray look-alikes + pydicom's bundled DICOM files)")
    try:
        service = _service(current)
        report = IngestPipeline(service).run(sample_dir)
        out.print(f"{report.summary()} ({report.images_per_second:.2f} images/s end to end)", highlight=False)
        query = sample_dir / "study_02" / "view_1.png"
        out.print(f"query: {query}")
        payload = run_search(service, path=query, k=k)
    except RetrievalError as exc:
        raise fail(exc, as_json=False) from None
    _print_results(payload)
    out.print(f"weights: {payload['model']['weights']}  space: {payload['space']['key'][:12]} ({payload['space']['pooling']})")
    if not serve_after:
        service.close()
        return
    import uvicorn

    from api.main import create_app

    out.print(f"serving the archive on http://127.0.0.1:{port} (OpenAPI docs at /docs); Ctrl-C stops", highlight=False)
    uvicorn.run(create_app(current, service=service), host="127.0.0.1", port=port, log_level="warning")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending database migrations (also done automatically on first use)."""
    from retrieval.store import Store, current_revision

    with reported_errors():
        store = Store.open(settings())
    out.print(f"database at revision {current_revision(store.engine)}", highlight=False)
