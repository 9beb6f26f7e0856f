"""Train a logistic-regression probe on exported MedVAE vectors (or S2 latents).

    retrieval ingest labelled.csv                  # a manifest with a `labels` column
    retrieval export exported/ --include-s2
    python docs/examples/probe.py exported/ --label effusion [--features s2]

Splits by study (no study on both sides), standardises, fits scikit-learn's LogisticRegression
and prints held-out accuracy and AUROC for "has the label" vs "has not".
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def load(export_dir: Path, features: str) -> tuple[np.ndarray, list[dict[str, str]]]:
    rows = {int(row["image_id"]): row for row in csv.DictReader((export_dir / "metadata.csv").open())}
    parts, ids = [], []
    for shard in sorted(export_dir.glob("latents-*.npz")):
        data = np.load(shard)
        matrix = data["vectors"] if features == "vectors" else data[features].reshape(len(data["image_ids"]), -1)
        parts.append(matrix.astype(np.float32))
        ids.extend(int(i) for i in data["image_ids"])
    return np.concatenate(parts), [rows[i] for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--label", required=True)
    parser.add_argument("--features", default="vectors", choices=["vectors", "z", "s2"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, rows = load(args.export_dir, args.features)
    y = np.array([args.label in row["labels"].split("|") for row in rows])
    groups = [row["study_id"] for row in rows]
    train, test = next(GroupShuffleSplit(n_splits=1, test_size=0.3, random_state=args.seed).split(x, y, groups))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(x[train], y[train])
    scores = probe.predict_proba(x[test])[:, 1]
    auroc = roc_auc_score(y[test], scores) if 0 < y[test].sum() < len(test) else float("nan")
    print(f"features={args.features} dim={x.shape[1]} train={len(train)} test={len(test)} "
          f"accuracy={accuracy_score(y[test], scores >= 0.5):.3f} auroc={auroc:.3f}")


if __name__ == "__main__":
    main()
