"""Running the service: ``serve`` (the API and page), ``sample`` and ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli.common import (
    DEMO_INPUT_SIZE,
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
from retrieval.cli.search import print_results
from retrieval.errors import RetrievalError


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the HTTP API (OpenAPI docs at /docs) with uvicorn."""
    import uvicorn

    from api.main import create_app

    current = model_settings()
    with reported_errors():  # an unreachable database is one line here, not a failed uvicorn start-up
        service = service_for(current)
    out.print(f"serving on http://{host}:{port} (OpenAPI docs at /docs)", highlight=False)
    uvicorn.run(create_app(current, service=service), host=host, port=port, log_level="info")


@app.command()
def sample(target: Annotated[Path, typer.Argument(help="Folder to write the sample archive into.")] = Path("data/sample")) -> None:
    """Write the bundled sample archive (pydicom test files + generated chest X-ray look-alikes)."""
    from retrieval.ops.sample import write_sample_set

    write_sample_set(target)
    out.print(f"sample archive written to {target}", highlight=False)


@app.command()
def demo(
    k: Annotated[int, typer.Option("-k", help="Studies to show for the demo query.")] = 3,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Then serve the API on 127.0.0.1:8000.")] = True,
    port: Annotated[int, typer.Option(help="Port for --serve.")] = 8000,
) -> None:
    """Write the sample archive, ingest it, run a similar-case search, then serve the API."""
    import os

    from retrieval.ingest.pipeline import IngestPipeline
    from retrieval.ops.demo import demo_weights
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
    sample_dir = current.storage.data_dir / "sample"
    write_sample_set(sample_dir, studies=4, images_per_study=2)
    out.print(f"sample archive: {sample_dir} (synthetic chest X-ray look-alikes + pydicom's bundled DICOM files)")
    try:
        service = service_for(current)
        report = IngestPipeline(service).run(sample_dir)
        out.print(f"{report.summary()} ({report.images_per_second:.2f} images/s end to end)", highlight=False)
        query = sample_dir / "study_02" / "view_1.png"
        out.print(f"query: {query}")
        payload = run_search(service, path=query, k=k)
    except RetrievalError as exc:
        raise fail(exc, as_json=False) from None
    print_results(payload)
    out.print(f"weights: {payload['model']['weights']}  space: {payload['space']['key'][:12]} ({payload['space']['pooling']})", markup=False)
    if not serve_after:
        service.close()
        return
    import uvicorn

    from api.main import create_app

    out.print(f"serving the archive on http://127.0.0.1:{port} (OpenAPI docs at /docs); Ctrl-C stops", highlight=False)
    uvicorn.run(create_app(current, service=service), host="127.0.0.1", port=port, log_level="warning")
