"""Commands that write the archive: ``ingest`` (folders, manifests, DICOMweb) and ``worker`` (API jobs)."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated, Any, Optional

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from retrieval.cli.common import (
    State,
    app,
    err,
    fail,
    model_settings,
    out,
    reported_errors,
    service_for,
    settings,
    warn_if_random,
)
from retrieval.errors import InvalidRequestError, RetrievalError


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
    previews: Annotated[bool, typer.Option("--previews", help="Also decode every preview now (a decoder pass; cheap on a GPU), so the page shows them at once.")] = False,
    on_ray: Annotated[bool, typer.Option("--ray", help="Run on a Ray cluster (PostgreSQL only): decode on CPU workers, encode on one actor per GPU.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="--ray: the cluster to join (e.g. ray://head:10001, or auto); default RAY_ADDRESS, else a local cluster.")] = None,
) -> None:
    """Encode and store every new image of SOURCE; already stored images are skipped."""
    if quality is not None:
        State.settings_overrides["ingest_quality"] = quality
    current = settings()
    warn_if_random(current)
    if ray_address and not on_ray:
        raise fail(InvalidRequestError("--ray-address needs --ray", detail={"field": "ray_address"}), as_json=as_json)
    if previews and on_ray:
        raise fail(InvalidRequestError("--previews is not available with --ray: run `retrieval previews` afterwards",
                                       detail={"field": "previews"}), as_json=as_json)
    try:
        source = _ingest_source(source, since=since, modality=modality, studies=study or [])
        if on_ray:
            report, service = _ingest_on_ray(current, source, ray_address)
        else:
            report, service = _ingest_here(current, source, previews=previews, show_progress=show_progress)
    except RetrievalError as exc:
        raise fail(exc, as_json=as_json) from None
    _print_report(report, service, as_json=as_json)
    if strict and report.failed:
        raise typer.Exit(code=1)


def _ingest_on_ray(current: Any, source: str, address: str | None) -> tuple[Any, Any]:
    """``ingest --ray``: checks first (SQLite is refused before a cluster starts); Ray Data shows its own progress.

    Everything Ray prints (its progress, a worker's death, forwarded worker logs) goes to stderr: stdout carries
    only the report, so ``--json`` stays one JSON document.
    """
    from retrieval.ingest.on_ray import check_ray_settings, ingest_on_ray

    check_ray_settings(current, source)
    service = service_for(current)
    with contextlib.redirect_stdout(sys.stderr):
        report = ingest_on_ray(service, source, address=address, announce=lambda line: err.print(line, highlight=False))
    service.close()
    return report, service


def _ingest_here(current: Any, source: str, *, previews: bool, show_progress: bool) -> tuple[Any, Any]:
    """The single-machine pipeline, with a Rich progress bar on stderr."""
    from retrieval.ingest.pipeline import IngestPipeline

    service = service_for(current)
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err, disable=not show_progress,
        transient=False,
    ) as progress:
        task = progress.add_task("scanning", total=None, rate="")

        def on_progress(report: Any) -> None:
            if report.phase == "scanning":  # a large folder takes a while to list: show it growing
                progress.update(task, description=f"scanning: {report.total} files found", total=None, completed=0)
                return
            done = report.ingested + report.skipped + report.failed
            progress.update(task, description="ingest", total=report.total or None, completed=done,
                            rate=f"{report.images_per_second_live():.2f} img/s")

        pipeline = IngestPipeline(service, progress=on_progress, previews=previews)
        report = pipeline.run(source)
    service.close()
    return report, service


def _print_report(report: Any, service: Any, *, as_json: bool) -> None:
    if as_json:
        payload = {"model": service.model_info(), "space": service.space_info(), **report.as_dict()}
        out.print_json(json.dumps(payload))
    else:
        for failure in report.failures:
            out.print(f"failed [{failure.stage}] {failure.source}: {failure.reason}", highlight=False, markup=False)
        out.print(report.summary(), highlight=False)
        if report.ingested:
            out.print(f"{report.images_per_second:.2f} images/s end to end ({report.seconds['wall']:.1f}s)", highlight=False)


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
        runner = Worker(service_for(model_settings()), poll_seconds=poll)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: runner.stop())
        err.print(f"worker {runner.worker_id}: waiting for ingest jobs", highlight=False)
        ran = runner.run(once=once)
        runner.service.close()
    err.print(f"worker {runner.worker_id}: stopped after {ran} job(s)", highlight=False)
