"""Commands that read the archive: ``search`` and ``preview``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from retrieval.cli.common import (
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
from retrieval.errors import RetrievalError


@app.command()
def search(
    image: Annotated[Optional[Path], typer.Argument(help="Query image file (PNG, JPEG, DICOM, ...).")] = None,
    image_id: Annotated[Optional[int], typer.Option(help="Query with an image already in the archive.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="Number of studies (or images).")] = 10,
    filters: Annotated[Optional[list[str]], typer.Option("--filter", help="key=value: modality, body_part, view, laterality, patient_sex, label, date_from, date_to, age_from, age_to, study_uid, series_uid, sop_uid, min_score, min_psnr, max_psnr, min_ssim, max_ssim.")] = None,
    group_by: Annotated[str, typer.Option(help="study | image | patient")] = "study",
    exclude_same_patient: Annotated[bool, typer.Option(help="Drop images of the query's patient (needs --image-id or a DICOM query).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    sort: Annotated[str, typer.Option(help="score | psnr | ssim (reconstruction quality, worst first).")] = "score",
    more_like: Annotated[Optional[list[int]], typer.Option("--more-like", help="Relevance feedback: a stored image the results should resemble (repeatable).")] = None,
    less_like: Annotated[Optional[list[int]], typer.Option("--less-like", help="A stored image the results should not resemble (repeatable).")] = None,
    exclude_self: Annotated[bool, typer.Option(help="With --image-id: leave the query image out of the results.")] = False,
    rerank: Annotated[str, typer.Option(help="none | latent: re-score the ANN's top 100 with the whole stored latent.")] = "none",
    space: Annotated[Optional[str], typer.Option(help="Search another stored space of this archive (its key or first 8+ "
                                                 "characters; `retrieval doctor` lists them), e.g. a whitened one.")] = None,
    text: Annotated[Optional[str], typer.Option(help="Text query, e.g. \"right pleural effusion\" (a space with pooling "
                                                "biomedclip); with IMAGE or --image-id, combined with it.")] = None,
    text_weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="With an image and --text: the text's share "
                                               "(normalise((1 - w) * image + w * text)).")] = 0.5,
) -> None:
    """Find the studies most similar to IMAGE (or to --image-id, or to --text), optionally refined by --more-like /
    --less-like."""
    from retrieval.errors import InvalidRequestError
    from retrieval.query.search import run_search

    current = settings()
    said = warn_if_random(current)
    try:
        if image is not None and image_id is not None:
            raise InvalidRequestError("give IMAGE or --image-id, not both", detail={"field": "image"})
        if image is None and image_id is None and not more_like and text is None:
            raise InvalidRequestError("give IMAGE, --image-id, --text or --more-like", detail={"field": "image"})
        service = service_for(current, space=space)
        payload = run_search(
            service, path=image, image_id=image_id, k=k, filter_pairs=filters or [], group_by=group_by,
            exclude_same_patient=exclude_same_patient, sort=sort, exclude_self=exclude_self, rerank=rerank,
            positive=tuple(more_like or ()), negative=tuple(less_like or ()), text=text, text_weight=text_weight,
        )
    except RetrievalError as exc:
        raise fail(exc, as_json=as_json) from None
    if as_json:
        out.print_json(json.dumps(payload))
        return
    print_results(payload, said=said)


def print_results(payload: dict[str, Any], *, said: Sequence[str] = ()) -> None:
    """The results as lines; the payload's warnings first, but for those ``said`` already (weights warnings)."""
    for warning in payload.get("warnings", []):
        if warning not in said:
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if not payload["results"]:
        out.print("no results")
    for rank, result in enumerate(payload["results"], start=1):
        study = result["study"]
        out.print(f"{rank:>3}. score {result['score']:.4f}  study {study['study_id']} ({study['label']})", highlight=False)
        for image in result["images"]:
            out.print(f"       image {image['image_id']:>6}  {image['score']:.4f}  {image['source']}", highlight=False, markup=False)


@app.command()
def preview(
    image_id: Annotated[int, typer.Argument(help="Stored image id.")],
    output: Annotated[Path, typer.Argument(help="PNG file to write.")],
) -> None:
    """Write the MedVAE reconstruction of a stored image (decoded from its stored z) as PNG."""
    from retrieval.query.previews import preview_png

    with reported_errors():
        data = preview_png(service_for(model_settings()), image_id)
    output.write_bytes(data)
    out.print(f"wrote {output} (MedVAE reconstruction from the stored latent, not the original pixels)", highlight=False)
