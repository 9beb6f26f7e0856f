"""Archive maintenance: ``reindex``, ``export``, ``quality``, ``backup``, ``restore``, ``doctor``, ``db upgrade``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.cli.common import (
    app,
    db_app,
    err,
    model_settings,
    out,
    reported_errors,
    service_for,
    settings,
)


def shell_word(text: str) -> str:
    """``text`` as a shell word: quoted only where it holds characters the shell would expand (``[``, ``]``)."""
    return f"'{text}'" if any(c in text for c in "[]*?") else text


@app.command()
def reindex(
    pooling: Annotated[Optional[str], typer.Option("--to-pooling", help="Build a space with this pooling from stored z.")] = None,
    transform: Annotated[Optional[str], typer.Option(
        "--transform", help="Fit `whiten` (PCA-whitening) or `center` on the space's vectors and build the transformed "
        "space from stored z (a refit is a new space).")] = None,
) -> None:
    """Rebuild the index from stored vectors, derive a new pooling from stored z, or fit an archive transform."""
    from retrieval.model.pooling import parse_pooling
    from retrieval.ops.reindex import reindex as run_reindex

    with reported_errors():
        report = run_reindex(service_for(model_settings()), pooling=parse_pooling(pooling) if pooling else None,
                             transform=transform)
    out.print(
        f"space {report.space_key[:12]} (pooling {report.pooling}): {report.vectors_added} vectors derived from stored z, "
        f"index holds {report.index_count}",
        highlight=False, markup=False,
    )
    if pooling or transform:
        out.print(f"search it with `retrieval search --space {report.space_key[:12]}` (API and page: space "
                  f"{report.space_key[:12]}), or make it the default with RETRIEVAL_POOLING={shell_word(report.pooling)}",
                  highlight=False, markup=False)


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
        manifest = export_latents(service_for(model_settings()), out_dir, shard_size=shard_size, formats=chosen,
                                  include_s2=include_s2)
    files = len(manifest["shards"]) + (1 if manifest["hdf5"] else 0)
    out.print(f"exported {manifest['images']} images ({', '.join(chosen)}) in {files} file(s) to {out_dir}",
              highlight=False)


@app.command("quality")
def quality_command(
    limit: Annotated[int, typer.Option(help="Score at most this many stored images.")] = 100_000,
    batch: Annotated[int, typer.Option(help="Images per decoder batch.")] = 16,
) -> None:
    """Score stored images' reconstructions (PSNR/SSIM of decode(z) vs the re-read source file)."""
    from retrieval.query.quality import score_stored

    with reported_errors():
        scored, unreadable = score_stored(service_for(model_settings()), limit=limit, batch=batch)
    out.print(f"scored {scored} images; {unreadable} source files could not be read", highlight=False)


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
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    no_model: Annotated[bool, typer.Option("--no-model", help="Skip loading the model.")] = False,
) -> None:
    """Environment, weights, database and index state."""
    from retrieval.ops.doctor import diagnose

    report = diagnose(model_settings(), load_model=not no_model)
    if as_json:
        out.print_json(json.dumps(report, default=str))
    else:
        for section, value in report.items():
            if section in ("problems", "warnings"):
                continue
            if isinstance(value, dict):
                out.print(f"[bold]{section}[/]")
                for key, item in value.items():
                    out.print(f"  {key}: {item}", highlight=False, markup=False)
            else:
                out.print(f"[bold]{section}[/]: {value}", highlight=False)
        for warning in report["warnings"]:
            err.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
        for problem in report["problems"]:
            err.print(f"[bold red]problem:[/] {problem}", highlight=False)
    if report["problems"]:  # something is broken: scripts and health checks can rely on the exit status
        raise typer.Exit(code=1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending database migrations (also done automatically on first use)."""
    from retrieval.storage.database import current_revision
    from retrieval.storage.store import Store

    with reported_errors():
        store = Store.open(settings())
    out.print(f"database at revision {current_revision(store.engine)}", highlight=False)
