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

from retrieval.errors import InvalidRequestError, RetrievalError
from retrieval.config import Settings
from retrieval.model.weights import RANDOM_WEIGHTS_WARNING

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
    except Exception as exc:  # pydantic's ValidationError names the field; every command exits 2 with it
        raise fail(RetrievalError(f"invalid settings: {exc}"), as_json=False) from None


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
    source: Annotated[str, typer.Argument(help="Folder (recursive), CSV manifest with a `path` column, or dicomweb+http(s)://HOST:PORT/PATH.")],
    since: Annotated[Optional[str], typer.Option(help="DICOMweb: only studies dated on or after YYYY-MM-DD.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="DICOMweb: only series of these modalities, e.g. CR,DX.")] = None,
    study: Annotated[Optional[list[str]], typer.Option(help="DICOMweb: only this StudyInstanceUID (repeatable).")] = None,
    strict: Annotated[bool, typer.Option(help="Exit with status 1 when any file failed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
    quality: Annotated[Optional[bool], typer.Option("--quality/--no-quality", help="Score reconstructions (PSNR/SSIM; ~3.3x encode cost) [RETRIEVAL_INGEST_QUALITY].")] = None,
) -> None:
    """Encode and store every new image of SOURCE; already stored images are skipped."""
    from retrieval.ingest.pipeline import IngestPipeline

    if quality is not None:
        State.settings_overrides["ingest_quality"] = quality
    current = settings()
    warn_if_random(current)
    try:
        source = _ingest_source(source, since=since, modality=modality, studies=study or [])
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


def _ingest_source(source: str, *, since: str | None, modality: str | None, studies: list[str]) -> str:
    """The source string with the DICOMweb options folded in (they only apply to DICOMweb sources)."""
    from retrieval.ingest.dicomweb import DicomwebQuery, is_dicomweb

    if not is_dicomweb(source):
        if since or modality or studies:
            raise InvalidRequestError("--since, --modality and --study apply to dicomweb+http(s):// sources only",
                                      detail={"field": "source"})
        return source
    return DicomwebQuery.parse(source).narrowed(since=since, modality=modality, studies=studies).source_string()


@app.command()
def search(
    image: Annotated[Optional[Path], typer.Argument(help="Query image file (PNG, JPEG, DICOM, ...).")] = None,
    image_id: Annotated[Optional[int], typer.Option(help="Query with an image already in the archive.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Number of studies (or images).")] = 10,
    filters: Annotated[Optional[list[str]], typer.Option("--filter", help="key=value: modality, body_part, view, laterality, patient_sex, label, date_from, date_to, age_from, age_to, study_uid, series_uid, sop_uid, min_score, min_psnr, max_psnr, min_ssim, max_ssim.")] = None,
    group_by: Annotated[str, typer.Option(help="study | image")] = "study",
    exclude_same_patient: Annotated[bool, typer.Option(help="Drop images of the query's patient (needs --image-id or a DICOM query).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    sort: Annotated[str, typer.Option(help="score | psnr | ssim (reconstruction quality, worst first).")] = "score",
) -> None:
    """Find the studies most similar to IMAGE (or to --image-id)."""
    from retrieval.query.search import run_search

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
            exclude_same_patient=exclude_same_patient, sort=sort,
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
    from retrieval.model.pooling import parse_pooling
    from retrieval.ops.reindex import reindex as run_reindex

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
def export(
    out_dir: Annotated[Path, typer.Argument(help="Output folder for shards / latents.h5, metadata.csv, manifest.json.")],
    formats: Annotated[str, typer.Option("--format", help="npz, hdf5 or npz,hdf5.")] = "npz",
    include_s2: Annotated[bool, typer.Option("--include-s2", help="Also write the stage-2 latents.")] = False,
    shard_size: Annotated[int, typer.Option(help="Images per .npz shard (and per streamed chunk).")] = 1000,
) -> None:
    """Export stored latents (z), pooled vectors, optionally S2 latents, with metadata and labels."""
    from retrieval.ops.export import export_latents

    chosen = tuple(part.strip() for part in formats.split(",") if part.strip())
    with reported_errors():
        manifest = export_latents(_service(model_settings()), out_dir, shard_size=shard_size, formats=chosen,
                                  include_s2=include_s2)
    files = len(manifest["shards"]) + (1 if manifest["hdf5"] else 0)
    out.print(f"exported {manifest['images']} images ({', '.join(chosen)}) in {files} file(s) to {out_dir}",
              highlight=False)


@app.command()
def preview(
    image_id: Annotated[int, typer.Argument(help="Stored image id.")],
    output: Annotated[Path, typer.Argument(help="PNG file to write.")],
) -> None:
    """Write the MedVAE reconstruction of a stored image (decoded from its stored z) as PNG."""
    from retrieval.query.previews import preview_png

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
    from retrieval.ops.doctor import diagnose

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
    from retrieval.ops.sample import write_sample_set

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


@app.command("quality")
def quality_command(
    limit: Annotated[int, typer.Option(help="Score at most this many stored images.")] = 100_000,
    batch: Annotated[int, typer.Option(help="Images per decoder batch.")] = 16,
) -> None:
    """Score stored images' reconstructions (PSNR/SSIM of decode(z) vs the re-read source file)."""
    from retrieval.query.quality import score_stored

    with reported_errors():
        scored, unreadable = score_stored(_service(model_settings()), limit=limit, batch=batch)
    out.print(f"scored {scored} images; {unreadable} source files could not be read", highlight=False)


@app.command("eval")
def eval_command(
    manifest: Annotated[Path, typer.Argument(help="CSV with a `path` column and a label column (labels `|`-separated).")],
    label_column: Annotated[str, typer.Option(help="Column holding the labels.")] = "labels",
    k: Annotated[str, typer.Option("--k", help="Comma-separated cut-offs.")] = "1,5,10",
    exclude_same_patient: Annotated[bool, typer.Option(help="Never count an image of the query's patient.")] = False,
    poolings: Annotated[Optional[str], typer.Option(help="Pooling study: e.g. mean,spp:1,2,4,grid:4,gem:3 (from stored z).")] = None,
    near_duplicates: Annotated[bool, typer.Option("--near-duplicates", help="Robustness: transformed copies find their originals?")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write report.md and PNG plots into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Leave-one-out retrieval quality on labelled images already in the archive (image and study level)."""
    from retrieval.ops import eval_archive

    with reported_errors(as_json=as_json):
        service = _service(model_settings())
        ks = sorted({int(value) for value in k.split(",") if value.strip()})
        if not ks or ks[0] < 1:
            raise RetrievalError("--k needs positive integers, e.g. 1,5,10")
        items, not_in_archive = eval_archive.labelled_items(service, manifest, label_column)
        if len(items) < 2:
            raise RetrievalError(
                f"{manifest}: {len(items)} of its images are in the archive ({not_in_archive} rows are not in the "
                f"archive); run `retrieval ingest {manifest}` first"
            )
        payload: dict[str, Any] = {
            "space": service.space_info(),
            "items": len(items),
            "not_in_archive": not_in_archive,
            "exclude_same_patient": exclude_same_patient,
            "results": eval_archive.evaluate_archive(service, items, ks, exclude_same_patient=exclude_same_patient),
        }
        if poolings:
            specs = [spec.strip() for spec in _split_poolings(poolings)]
            payload["pooling_study"] = eval_archive.pooling_study(
                service, items, specs, ks, exclude_same_patient=exclude_same_patient
            )
        if near_duplicates:
            payload["near_duplicates"] = eval_archive.near_duplicates(service, items)
        if report is not None:
            payload["report"] = str(eval_archive.write_report(report, payload))
    if as_json:
        out.print_json(json.dumps(payload))
        return
    for level, result in payload["results"].items():
        out.print(f"{level:5} level, {result['queries']} queries: "
                  + "  ".join(f"P@{k_}={v}" for k_, v in result["precision_at_k"].items())
                  + "  " + "  ".join(f"mAP@{k_}={v}" for k_, v in result["map_at_k"].items()), highlight=False)
    if report is not None:
        out.print(f"report: {payload['report']}", highlight=False)


@app.command()
def classify(
    manifest: Annotated[Path, typer.Argument(help="CSV with a `path` column and a label column.")],
    label_column: Annotated[str, typer.Option(help="Column holding the labels.")] = "labels",
    k: Annotated[int, typer.Option("-k", help="Neighbours that vote.")] = 10,
    test_fraction: Annotated[float, typer.Option(help="Share of studies (patients when known) held out.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """kNN label voting on stored vectors: accuracy and AUROC per label on a held-out split by study/patient."""
    from retrieval.ops import eval_archive
    from retrieval.domain.evaluation import knn_classification

    with reported_errors(as_json=as_json):
        service = _service(model_settings())
        items, not_in_archive = eval_archive.labelled_items(service, manifest, label_column)
        if len(items) < 4:
            raise RetrievalError(f"{manifest}: only {len(items)} of its images are in the archive; ingest it first")
        vectors = service.store.vectors_of(service.space.id, [item.image_id for item in items])
        try:
            result = knn_classification(items, vectors, k=k, test_fraction=test_fraction, seed=seed)
        except ValueError as exc:
            raise RetrievalError(str(exc)) from None
        result.update(space=service.space_info(), not_in_archive=not_in_archive)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"kNN (k={k}) on {result['train']} train / {result['test']} held-out images", highlight=False)
    for label, row in result["per_label"].items():
        out.print(f"{label:24} accuracy {row['accuracy']:.3f}  AUROC {row['auroc'] if row['auroc'] is not None else 'n/a'}"
                  f"  ({row['positives']} positive, {row['negatives']} negative)", highlight=False)


def _split_poolings(text: str) -> list[str]:
    """``mean,spp:1,2,4,grid:4`` -> ``["mean", "spp:1,2,4", "grid:4"]`` (numbers belong to the spec before them)."""
    specs: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and specs:
            specs[-1] += f",{part}"
        elif part:
            specs.append(part)
    return specs


@app.command("backup")
def backup_command(
    target: Annotated[Path, typer.Argument(help="New or empty folder for the backup.")],
) -> None:
    """Back up the database (SQLite online backup or pg_dump) and the index files, with a manifest."""
    from retrieval.ops.backup import backup

    with reported_errors():
        manifest = backup(settings(), target)
    counts = manifest["counts"]
    out.print(f"backed up {counts['images']} images ({manifest['database']}) to {target}", highlight=False)


@app.command("restore")
def restore_command(
    source: Annotated[Path, typer.Argument(help="A folder written by `retrieval backup`.")],
    force: Annotated[bool, typer.Option(help="Overwrite a database that already holds images.")] = False,
) -> None:
    """Restore a backup into the configured (empty) database and data dir; checks every file's sha256."""
    from retrieval.ops.backup import restore

    with reported_errors():
        manifest = restore(settings(), source, force=force)
    out.print(f"restored {manifest['counts']['images']} images from {source} (backup of {manifest['created_at']})",
              highlight=False)


@app.command()
def worker(
    once: Annotated[bool, typer.Option("--once", help="Exit when the queue is empty instead of waiting.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between polls of an empty queue.")] = 2.0,
) -> None:
    """Run ingest jobs submitted through the API (POST /v1/ingest-jobs) until stopped.

    SIGTERM / Ctrl-C ends the current batch and gives the job back to the queue.
    """
    import signal

    from retrieval.ingest.worker import Worker

    with reported_errors():
        runner = Worker(_service(model_settings()), poll_seconds=poll)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: runner.stop())
        err.print(f"worker {runner.worker_id}: waiting for ingest jobs", highlight=False)
        ran = runner.run(once=once)
        runner.service.close()
    err.print(f"worker {runner.worker_id}: stopped after {ran} job(s)", highlight=False)


@app.command()
def demo(
    k: Annotated[int, typer.Option("-k", help="Studies to show for the demo query.")] = 3,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Then serve the API on 127.0.0.1:8000.")] = True,
    port: Annotated[int, typer.Option(help="Port for --serve.")] = 8000,
) -> None:
    """Write the sample archive, ingest it, run a similar-case search, then serve the API."""
    import os

    from retrieval.ops.demo import demo_weights
    from retrieval.ingest.pipeline import IngestPipeline
    from retrieval.ops.sample import write_sample_set
    from retrieval.query.search import run_search

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
    from retrieval.storage.store import Store, current_revision

    with reported_errors():
        store = Store.open(settings())
    out.print(f"database at revision {current_revision(store.engine)}", highlight=False)
