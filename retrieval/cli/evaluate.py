"""Retrieval quality on labelled archives (``eval``, ``classify``) and parity with medvae (``verify-weights``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from retrieval.cli.common import (
    app,
    err,
    fail,
    model_settings,
    out,
    reported_errors,
    service_for,
)
from retrieval.errors import RetrievalError


@app.command("eval")
def eval_command(
    manifest: Annotated[Path, typer.Argument(help="CSV with a `path` column and a label column (labels `|`-separated).")],
    label_column: Annotated[str, typer.Option(help="Column holding the labels.")] = "labels",
    k: Annotated[str, typer.Option("--k", help="Comma-separated cut-offs.")] = "1,5,10",
    exclude_same_patient: Annotated[bool, typer.Option(help="Never count an image of the query's patient.")] = False,
    poolings: Annotated[Optional[str], typer.Option(help="Pooling study: e.g. mean,spp:1,2,4,grid:4,gem:3 (from stored z).")] = None,
    near_duplicates: Annotated[bool, typer.Option("--near-duplicates", help="Robustness: transformed copies find their originals?")] = False,
    refine: Annotated[bool, typer.Option("--refine", help="Re-ranking with whole latents, 3 rounds of simulated relevance feedback and archive-fitted transforms (center, whiten), beside the plain P@k.")] = False,
    prompts: Annotated[Optional[str], typer.Option(help="Zero-shot: AUROC of each prompt against its label, e.g. "
                                                   "\"effusion=right pleural effusion,cardiomegaly\" (a biomedclip space).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write report.md and PNG plots into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Leave-one-out retrieval quality on labelled images already in the archive (image and study level)."""
    from retrieval.ops import eval_archive

    with reported_errors(as_json=as_json):
        service = service_for(model_settings())
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
        if refine:
            from retrieval.ops.eval_refine import refinement_study

            payload["refinement"] = refinement_study(service, items, ks, exclude_same_patient=exclude_same_patient)
        if prompts:
            from retrieval.ops.zero_shot import (
                parse_prompts,
                prompt_auroc,
                score_images,
            )

            scores = score_images(service, [item.image_id for item in items], parse_prompts(prompts))
            payload["zero_shot"] = prompt_auroc(items, scores)
        if report is not None:
            payload["report"] = str(eval_archive.write_report(report, payload))
    if as_json:
        out.print_json(json.dumps(payload))
        return
    for level, result in payload["results"].items():
        out.print(f"{level:5} level, {result['queries']} queries: "
                  + "  ".join(f"P@{k_}={v}" for k_, v in result["precision_at_k"].items())
                  + "  " + "  ".join(f"mAP@{k_}={v}" for k_, v in result["map_at_k"].items()), highlight=False)
    if "pooling_study" in payload:
        for row in payload["pooling_study"]:
            out.print(f"{row['pooling'][:40]:40} dim {row['dim']:>4}  " + "  ".join(
                f"P@{k_}={v}" for k_, v in row["precision_at_k"].items()) + "  " + "  ".join(
                f"mAP@{k_}={v}" for k_, v in row["map_at_k"].items()), highlight=False, markup=False)
    if "zero_shot" in payload:
        for label, row in payload["zero_shot"].items():
            out.print(f"zero-shot {label:20} AUROC {row['auroc'] if row['auroc'] is not None else 'n/a'}  "
                      f"({row['positives']} positive, {row['negatives']} negative; prompt \"{row['prompt']}\")",
                      highlight=False, markup=False)
    if "refinement" in payload:
        study = payload["refinement"]
        rows = [("plain", study["plain"]), ("rerank=latent", study["rerank_latent"]),
                *((f"feedback round {n}", p) for n, p in enumerate(study["feedback"], start=1)),
                ("transform center", study["center"]), ("transform whiten", study["whiten"])]
        for name, precision in rows:
            out.print(f"{name:17} " + "  ".join(f"P@{k_}={v}" for k_, v in precision.items()), highlight=False)
        out.print("scores between images: " + "  ".join(
            f"{name} {row['mean']:.3f} ± {row['std']:.3f}" for name, row in study["scores"].items()), highlight=False)
    if report is not None:
        out.print(f"report: {payload['report']}", highlight=False)


@app.command()
def classify(
    manifest: Annotated[Optional[Path], typer.Argument(help="CSV with a `path` column and a label column (kNN; with "
                                                       "--prompts: only its images, plus AUROC per prompt).")] = None,
    label_column: Annotated[str, typer.Option(help="Column holding the labels.")] = "labels",
    k: Annotated[int, typer.Option("-k", help="Neighbours that vote.")] = 10,
    test_fraction: Annotated[float, typer.Option(help="Share of studies (patients when known) held out.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    prompts: Annotated[Optional[str], typer.Option(help="Zero-shot labels from text prompts, comma-separated "
                                                   "(`label=prompt` or `prompt`), in a space with pooling biomedclip: "
                                                   "every stored image scored, CSV out.")] = None,
    out_csv: Annotated[Optional[Path], typer.Option("--out", help="--prompts: write the CSV here (default: stdout).")] = None,
    space: Annotated[Optional[str], typer.Option(help="--prompts: score in this stored space (key or 8+ characters), "
                                                 "e.g. the biomedclip space an ingest filled beside the default.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """kNN label voting on stored vectors (accuracy and AUROC per label on a held-out split by study/patient), or,
    with --prompts, zero-shot labels: each stored image's cosine and probability per prompt."""
    from retrieval.domain.evaluation import knn_classification
    from retrieval.ops import eval_archive

    if prompts is not None:
        _zero_shot_command(manifest, label_column, prompts, out_csv, space, as_json=as_json)
        return
    with reported_errors(as_json=as_json):
        if manifest is None:
            raise RetrievalError("classify needs MANIFEST (kNN voting) or --prompts (zero-shot)")
        service = service_for(model_settings())
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


def _zero_shot_command(manifest: Path | None, label_column: str, prompts: str, out_csv: Path | None,
                       space: str | None, *, as_json: bool) -> None:
    """``classify --prompts``: score stored images (all of the space's, or the manifest's) against text prompts."""
    import sys

    from retrieval.ops import eval_archive
    from retrieval.ops.zero_shot import (
        parse_prompts,
        prompt_auroc,
        score_images,
        score_rows,
        space_vectors_by_id,
        write_csv,
    )

    with reported_errors(as_json=as_json):
        parsed = parse_prompts(prompts)
        service = service_for(model_settings(), space=space)
        items = eval_archive.labelled_items(service, manifest, label_column)[0] if manifest else []
        ids, vectors = ([item.image_id for item in items], None) if manifest else space_vectors_by_id(service)
        if not ids:
            raise RetrievalError("no stored images to score" + (f": none of {manifest}'s images is in the archive"
                                                                 if manifest else ": ingest first"))
        scores = score_images(service, ids, parsed, image_vectors=vectors)
        aurocs = prompt_auroc(items, scores) if items else None
        if out_csv is not None:
            with out_csv.open("w", newline="") as handle:
                written = write_csv(handle, score_rows(service, scores))
    if as_json:
        rows = None if out_csv else list(score_rows(service, scores))
        out.print_json(json.dumps({"space": service.space_info(), "images": len(ids), "csv": str(out_csv) if out_csv
                                   else None, "scores": rows, "auroc": aurocs, "warnings": service.placeholder_warnings()}))
        return
    if out_csv is None:
        write_csv(sys.stdout, score_rows(service, scores))
    else:
        err.print(f"{written} images scored against {len(parsed)} prompts: {out_csv}", highlight=False)
    for label, row in (aurocs or {}).items():
        err.print(f"{label:24} AUROC {row['auroc'] if row['auroc'] is not None else 'n/a'}  ({row['positives']} "
                  f"positive, {row['negatives']} negative)", highlight=False, markup=False)


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


PARITY_COLUMNS = (("model_input", "input"), ("z", "z"), ("s2", "s2"), ("vector", "vector"))


def _figure(value: float | None) -> str:
    return "   —    " if value is None else f"{value:.2e}"


@app.command("verify-weights")
def verify_weights_command(
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Images to compare, or NIfTI volumes for a 3-D model (default: the bundled sample's PNGs, or two "
        "generated phantoms, a CT and an MR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Run medvae's own loader and model beside this project's path on the same images; exit 1 when they differ.

    Run it first with real weights (hub or a checkpoint): fp32 differences above 1e-4 (relative) fail.
    """
    import tempfile

    from retrieval.ops.sample import write_sample_set, write_sample_volumes
    from retrieval.ops.verify import verify_weights

    current = model_settings()
    with reported_errors(as_json=as_json), tempfile.TemporaryDirectory() as folder:
        if not images and current.model.dims == 3:
            images = write_sample_volumes(Path(folder) / "volumes")
        elif not images:
            sample = write_sample_set(Path(folder) / "sample", studies=2, images_per_study=2)
            images = sorted(p for p in sample.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        missing = [str(path) for path in images if not path.is_file()]
        if missing:
            raise fail(RetrievalError(f"{missing[0]}: no such file"), as_json=as_json)
        result = verify_weights(current, list(images))
    if as_json:
        out.print_json(json.dumps(result))
    else:
        out.print(f"{result['model']} ({result['weights']}): medvae's path vs ours, fp32, tolerance {result['tolerance']:g}",
                  highlight=False)
        for row in result["images"]:
            verdict = "known" if row["departures"] else "ok" if row["passed"] else "DIFFERS"
            figures = "  ".join(f"{name} {_figure(row[key])}" for key, name in PARITY_COLUMNS
                                if row[key] is not None or key != "model_input")
            out.print(f"  {verdict:7} {figures}  {row['source']}", highlight=False, markup=False)
            for departure in row["departures"]:
                out.print(f"          known departure (not counted): {departure}", highlight=False, markup=False)
        out.print("parity holds" if result["passed"] else "parity does NOT hold", highlight=False)
    if not result["passed"]:
        raise typer.Exit(code=1)
