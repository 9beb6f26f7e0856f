"""`retrieval eval`: the metrics of :mod:`retrieval.domain.evaluation` on images already in the archive.

* :func:`labelled_items` matches a labelled CSV manifest to stored images by file content (sha256),
  so the manifest may name files by any path; rows not in the archive are counted, not guessed.
* :func:`evaluate_archive` runs leave-one-out retrieval at image and study level in the configured
  space (stored vectors, exact search).
* :func:`pooling_study` re-pools the stored z of the same images with every pooling given (no
  re-encode) and reports metrics, dimension, search time and fidelity to exact cosine on the
  full flattened stage-2 latent.
* :func:`near_duplicates` re-encodes transformed copies of the source files and reports recall@1/@5
  of their originals.
* :func:`write_report` writes ``report.md`` with PNG plots (matplotlib, Agg backend).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.domain.evaluation import EvalItem, evaluate, rankings, recall_of_exact
from retrieval.errors import InvalidRequestError
from retrieval.ingest.sources import scan
from retrieval.model.pooling import parse_pooling
from retrieval.service import SpaceService


def _labels(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.replace(";", "|").split("|") if part.strip())


def labelled_items(service: SpaceService, manifest: Path, label_column: str) -> tuple[list[EvalItem], int]:
    """Stored images named by the manifest, with their labels; returns ``(items, rows not in the archive)``."""
    rows = [item for item in scan(manifest) if not item.error]  # the ingest's own manifest reader
    if rows and label_column not in rows[0].row:
        raise InvalidRequestError(
            f"{manifest}: no `{label_column}` column (found: {', '.join(rows[0].row)})",
            detail={"field": label_column, "columns": list(rows[0].row)},
        )
    by_sha: dict[str, frozenset[str]] = {}
    for row in rows:
        try:
            by_sha[hashlib.sha256(Path(row.path).read_bytes()).hexdigest()] = _labels(row.row.get(label_column) or "")
        except OSError:
            continue
    images = service.store.images_by_sha256(list(by_sha))
    items = [
        EvalItem(image_id=image.id, study_id=image.study_id, labels=by_sha[image.sha256], patient=image.patient_hash)
        for image in sorted(images, key=lambda image: image.id)
    ]
    return items, len(rows) - len(items)


def evaluate_archive(
    service: SpaceService, items: list[EvalItem], ks: list[int], *, exclude_same_patient: bool
) -> dict[str, Any]:
    vectors = service.store.vectors_of(service.space.id, [item.image_id for item in items])
    return {
        level: evaluate(rankings(items, vectors, level=level, exclude_same_patient=exclude_same_patient), ks,
                        level=level).as_dict()
        for level in ("image", "study")
    }


def _stored_latents(service: SpaceService, items: list[EvalItem]) -> list[np.ndarray]:
    """The stored z of ``items``, in order (volumes' shapes differ)."""
    stored = service.store.latents_of([item.image_id for item in items], service.space.encoder_key)
    missing = [item.image_id for item in items if item.image_id not in stored]
    if missing:
        raise InvalidRequestError(f"images without a stored latent for this encoder: {missing[:10]}")
    return [stored[item.image_id] for item in items]


def pooling_study(
    service: SpaceService, items: list[EvalItem], poolings: list[str], ks: list[int], *, exclude_same_patient: bool
) -> list[dict[str, Any]]:
    """One row per pooling (a head: ``spp:1,2,4``, ``biomedclip``, ...): metrics overall and per label, dimension,
    exact-search ms/query, fidelity to the full S2 latent. Vectors are made from stored z, so the spaces are
    compared on the same images whether or not they have been built."""
    latents = _stored_latents(service, items)
    reference = torch.nn.functional.normalize(service.whole_latents(latents), dim=1).numpy()
    rows = []
    for spec_text in poolings:
        spec = parse_pooling(spec_text)
        vectors = service.pooled(latents, spec)
        tick = time.perf_counter()
        _ = vectors @ vectors.T  # exact search of every item against every item
        search_ms = (time.perf_counter() - tick) * 1e3 / max(1, len(items))
        image = evaluate(rankings(items, vectors, exclude_same_patient=exclude_same_patient), ks)
        rows.append({
            "pooling": service.identity(spec).pooling,
            "dim": int(vectors.shape[1]),
            "precision_at_k": image.as_dict()["precision_at_k"],
            "map_at_k": image.as_dict()["map_at_k"],
            "per_label": image.per_label,
            "search_ms_per_query": round(search_ms, 4),
            "recall_at_10_vs_full_s2": round(recall_of_exact(vectors, reference, k=min(10, len(items) - 1)), 4),
        })
    return rows


# -- robustness: transformed copies of the source files

Transform = Callable[[np.ndarray], np.ndarray]


def _resize(pixels: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape
    image = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(image.resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BILINEAR), np.float32)


def _rotate(pixels: np.ndarray, degrees: float) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels.astype(np.float32), mode="F").rotate(degrees, Image.BILINEAR), np.float32)


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())), np.float32) / 255.0


def _crop(pixels: np.ndarray, fraction: float) -> np.ndarray:
    h, w = pixels.shape
    dy, dx = int(h * fraction / 2), int(w * fraction / 2)
    return pixels[dy : h - dy or h, dx : w - dx or w]


TRANSFORMS: dict[str, Transform] = {
    "identity": lambda p: p,
    "resize_0.5": lambda p: _resize(p, 0.5),
    "crop_5pct": lambda p: _crop(p, 0.05),
    "rotate_3deg": lambda p: _rotate(p, 3.0),
    "brightness_+0.1": lambda p: np.clip(p + 0.1, 0, 1),
    "contrast_1.2": lambda p: np.clip((p - 0.5) * 1.2 + 0.5, 0, 1),
    "gamma_0.8": lambda p: np.clip(p, 0, 1) ** 0.8,
    "jpeg_q75": lambda p: _jpeg(p, 75),
    "bits_16_to_8": lambda p: np.round(np.clip(p, 0, 1) * 255) / 255,
    "window_narrower": lambda p: np.clip((p - 0.1) / 0.8, 0, 1),  # a different DICOM window / level
}


def near_duplicates(service: SpaceService, items: list[EvalItem], *, limit: int = 100) -> dict[str, dict[str, float]]:
    """recall@1 and @5 of each original when its transformed copy is the query."""
    from dataclasses import replace

    from retrieval.imaging.decode import decode_path

    images = service.store.images_by_id([item.image_id for item in items[:limit]])
    index = service.searchable_index()
    found: dict[str, list[int]] = {name: [] for name in TRANSFORMS}
    for image_id, image in sorted(images.items()):
        try:
            decoded = decode_path(image.source_uri, max_pixels=service.settings.ingest.max_image_pixels)
        except Exception:  # noqa: BLE001 - a moved or unreadable source is skipped, not a failure of the suite
            continue
        for name, transform in TRANSFORMS.items():
            vector = service.embed(replace(decoded, pixels=transform(decoded.pixels)))[1]
            ranked = [hit for hit, _ in index.search(vector, 5)[0]]
            found[name].append(ranked.index(image_id) + 1 if image_id in ranked else 0)
    return {
        name: {
            "queries": len(ranks),
            "recall_at_1": round(float(np.mean([r == 1 for r in ranks])), 4) if ranks else 0.0,
            "recall_at_5": round(float(np.mean([r >= 1 for r in ranks])), 4) if ranks else 0.0,
        }
        for name, ranks in found.items()
    }


def _pooling_plot(path: Path, rows: list[dict[str, Any]], k_max: int) -> None:
    """Grouped bars: P@k_max per label (and over all queries), one bar per pooling."""
    import matplotlib.pyplot as plt

    labels = ["all", *sorted({label for row in rows for label in row["per_label"]})]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) * max(1, len(rows)) / 2 + 2), 3.4))
    width = 0.8 / len(rows)
    for position, row in enumerate(rows):
        values = [row["precision_at_k"][str(k_max)] if label == "all" else
                  row["per_label"].get(label, {}).get(f"precision_at_{k_max}", 0.0) for label in labels]
        ax.bar([i + position * width for i in range(len(labels))], values, width, label=row["pooling"][:32])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
    ax.set_ylabel(f"precision@{k_max}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, payload: dict[str, Any]) -> Path:
    """``report.md`` + ``precision_at_k.png`` + ``per_label.png`` under ``out``.

    Over 60 lines: the report's sections and the two plots are written top to bottom, as they appear.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    results = payload["results"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for level, result in results.items():
        ks = [int(k) for k in result["precision_at_k"]]
        ax.plot(ks, list(result["precision_at_k"].values()), marker="o", label=f"{level} level")
    ax.set_xlabel("k")
    ax.set_ylabel("precision@k")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "precision_at_k.png", dpi=120)
    plt.close(fig)
    per_label = results["image"]["per_label"]
    k_max = max(int(k) for k in results["image"]["precision_at_k"])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(per_label) + 2), 3.2))
    ax.bar(list(per_label), [row[f"precision_at_{k_max}"] for row in per_label.values()])
    ax.set_ylabel(f"precision@{k_max}")
    ax.set_ylim(0, 1)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out / "per_label.png", dpi=120)
    plt.close(fig)
    lines = [
        "# Retrieval evaluation",
        "",
        f"Space `{payload['space']['key'][:12]}` ({payload['space']['pooling']}, weights {payload['space']['weights']}); "
        f"{payload['items']} labelled images, {payload['not_in_archive']} manifest rows not in the archive; "
        f"same-patient exclusion: {payload['exclude_same_patient']}.",
        "",
        "| level | queries | " + " | ".join(f"P@{k}" for k in results["image"]["precision_at_k"])
        + " | " + " | ".join(f"mAP@{k}" for k in results["image"]["map_at_k"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in range(2 * len(results["image"]["precision_at_k"]))) + " |",
    ]
    for level, result in results.items():
        lines.append(f"| {level} | {result['queries']} | " + " | ".join(str(v) for v in result["precision_at_k"].values())
                     + " | " + " | ".join(str(v) for v in result["map_at_k"].values()) + " |")
    lines += ["", "![precision@k](precision_at_k.png)", "", "## Per label (image level)", "",
              "| label | queries | " + " | ".join(f"P@{k}" for k in results["image"]["precision_at_k"]) + " |",
              "| --- | --- | " + " | ".join("---" for _ in results["image"]["precision_at_k"]) + " |"]
    for label, row in per_label.items():
        lines.append(f"| {label} | {row['queries']} | "
                     + " | ".join(str(row[f"precision_at_{k}"]) for k in results["image"]["precision_at_k"]) + " |")
    lines += ["", "![per label](per_label.png)", ""]
    if payload.get("pooling_study"):
        _pooling_plot(out / "poolings.png", payload["pooling_study"], k_max)
        ks = list(payload["pooling_study"][0]["precision_at_k"])
        lines += ["## Pooling study", "",
                  "| pooling | dim | " + " | ".join(f"P@{k}" for k in ks) + " | " + " | ".join(f"mAP@{k}" for k in ks)
                  + " | search ms/query | recall@10 vs full S2 |",
                  "| --- | --- | " + " | ".join("---" for _ in range(2 * len(ks))) + " | --- | --- |"]
        for row in payload["pooling_study"]:
            lines.append(f"| {row['pooling']} | {row['dim']} | "
                         + " | ".join(str(row["precision_at_k"][k]) for k in ks) + " | "
                         + " | ".join(str(row["map_at_k"][k]) for k in ks)
                         + f" | {row['search_ms_per_query']} | {row['recall_at_10_vs_full_s2']} |")
        labels = sorted({label for row in payload["pooling_study"] for label in row["per_label"]})
        lines += ["", f"P@{k_max} per label:", "", "| pooling | " + " | ".join(labels) + " |",
                  "| --- | " + " | ".join("---" for _ in labels) + " |"]
        for row in payload["pooling_study"]:
            lines.append(f"| {row['pooling']} | " + " | ".join(
                str(row["per_label"].get(label, {}).get(f"precision_at_{k_max}", "")) for label in labels) + " |")
        lines += ["", "![poolings](poolings.png)", ""]
    if payload.get("zero_shot"):
        lines += ["## Zero-shot labels (text prompts)", "", "| label | prompt | AUROC | positives | negatives |",
                  "| --- | --- | --- | --- | --- |"]
        for label, row in payload["zero_shot"].items():
            lines.append(f"| {label} | {row['prompt']} | {row['auroc'] if row['auroc'] is not None else 'n/a'} | "
                         f"{row['positives']} | {row['negatives']} |")
        lines.append("")
    if payload.get("near_duplicates"):
        lines += ["## Near-duplicates", "", "| transform | queries | recall@1 | recall@5 |", "| --- | --- | --- | --- |"]
        for name, row in payload["near_duplicates"].items():
            lines.append(f"| {name} | {row['queries']} | {row['recall_at_1']} | {row['recall_at_5']} |")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
