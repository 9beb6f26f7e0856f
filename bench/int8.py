"""int8 encoding on the CPU (issue 18, item 5): OpenVINO + NNCF post-training quantisation against bf16 and fp32.

The rule: ``RETRIEVAL_PRECISION=int8`` is adopted only if, in one run on one machine, int8 encodes
at least 1.7x faster than bf16 and its top-10 neighbours agree with fp32's on at least 95 % of
queries. This script measures both and says which way it went.

* **Archive**: ``--studies`` synthetic chest-radiograph studies (``retrieval.ops.sample``: each study
  its own anatomy, its views differing in noise, position and exposure), ``--images`` images in all,
  at the model's input size. **Calibration**: ``--calibration`` further images of other studies,
  never the archive's.
* **Models**: the encoder's posterior mode (``PosteriorMode``, as served) converted once to OpenVINO;
  compiled as f32, as bf16, and quantised by ``nncf.quantize`` (int8 weights and activations where
  NNCF places them; the rest run in bf16 where the CPU has it, ``int8+bf16``, and in f32, ``int8+f32``).
* **Time**: seconds per image at batch 1 (the service's CPU path), mean over the archive after one warm-up.
* **Neighbours**: each archive image's vector (``spp:1,2,4`` of the stage-2 latent computed in fp32 from
  that runtime's z) queries the rest by cosine; its top 10 is compared with fp32's: ``agreement`` is the
  mean overlap, ``same_top10`` the share of queries whose top-10 set is fp32's exactly, and
  ``queries_agreeing`` the share with at least 9 of 10 in common (the rule's test).
* **Weights**: ``random`` (the exact architecture, seeded) unless ``--weights`` names real ones. With random
  weights the activation statistics are not a trained network's: the speed figure carries over, the
  agreement figure is indicative only until re-run on real weights.

Needs ``pip install nncf`` (3.4.0 measured; not a project dependency: int8 was not adopted, docs/benchmarks.md)::

    python -m bench.int8 --studies 12 --images 48 --calibration 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.model.encoder import MedVAEEncoder, cpu_has_bf16
from retrieval.model.openvino_runtime import OpenVinoModule, PosteriorMode
from retrieval.model.pooling import parse_pooling, pool
from retrieval.ops.sample import study_variant, synthetic_chest

logger = logging.getLogger("bench.int8")

SPEEDUP_NEEDED = 1.7
AGREEMENT_NEEDED = 0.95


def archive(studies: int, per_study: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images, study of each)``: views of a study share its anatomy and differ in noise, shift and exposure."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for study in range(studies):
        variant = study_variant(rng)
        for _ in range(per_study):
            image = synthetic_chest(rng, size, variant=variant)
            shift = rng.integers(-size // 24, size // 24 + 1, size=2)
            image = np.roll(image, tuple(int(s) for s in shift), axis=(0, 1))
            images.append(np.clip(image * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05), 0, 1))
            labels.append(study)
    return np.stack(images).astype(np.float32), np.array(labels)


def compile_model(ov_model: Any, precision: str, threads: int) -> Any:
    import openvino as ov

    return ov.Core().compile_model(ov_model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
    })


def encode_all(compiled: Any, inputs: np.ndarray) -> tuple[np.ndarray, float]:
    """z of every input at batch 1, and the mean seconds per image (after one warm-up inference)."""
    request = compiled.create_infer_request()
    request.infer({0: inputs[:1]})
    outputs = []
    start = time.perf_counter()
    for item in inputs:
        outputs.append(np.array(request.infer({0: item[None]})[0], dtype=np.float32, copy=True))
    return np.concatenate(outputs), (time.perf_counter() - start) / len(inputs)


def top10(vectors: np.ndarray) -> np.ndarray:
    """Each row's 10 nearest other rows by cosine (leave-one-out)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def neighbour_agreement(found: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    overlap = np.array([len(set(a) & set(b)) for a, b in zip(found, reference, strict=True)])
    return {"agreement": round(float(overlap.mean() / 10), 4), "same_top10": round(float((overlap == 10).mean()), 4),
            "queries_agreeing": round(float((overlap >= 9).mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--images", type=int, default=48, help="archive images (split evenly over the studies)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration images (other studies)")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import nncf
    import openvino as ov

    torch.set_num_threads(args.threads)
    encoder = MedVAEEncoder(Settings(weights=args.weights, input_size=args.size, device="cpu", precision="fp32",
                                     compile="off", runtime="torch"))
    images, labels = archive(args.studies, max(1, args.images // args.studies), args.size, seed=1)
    calibration, _ = archive(max(1, args.calibration // 4), 4, args.size, seed=2)
    inputs = encoder.to_model_input(images).numpy()
    item_shape = tuple(inputs.shape[1:])
    ov_model = OpenVinoModule._convert(PosteriorMode(encoder.model).eval(), "encoder", item_shape)

    tick = time.perf_counter()
    calibration_inputs = encoder.to_model_input(calibration).numpy()
    quantised = nncf.quantize(ov_model, nncf.Dataset([item[None] for item in calibration_inputs]),
                              subset_size=len(calibration_inputs))
    quantise_s = time.perf_counter() - tick
    logger.info("quantised on %d calibration images in %.0f s", len(calibration_inputs), quantise_s)

    variants = {"f32": (ov_model, "f32"), "int8+f32": (quantised, "f32")}
    if cpu_has_bf16():
        variants |= {"bf16": (ov_model, "bf16"), "int8+bf16": (quantised, "bf16")}
    spec = parse_pooling("spp:1,2,4")
    rows: dict[str, dict[str, Any]] = {}
    neighbours: dict[str, np.ndarray] = {}
    reference_z = np.zeros(0)
    for name, (model, precision) in variants.items():  # f32 first: the reference
        z, seconds = encode_all(compile_model(model, precision, args.threads), inputs)
        reference_z = z if name == "f32" else reference_z
        vectors = pool(encoder.s2_latent(torch.from_numpy(z)), spec).numpy()
        neighbours[name] = top10(vectors)
        same_study = np.mean([np.mean(labels[row] == labels[q]) for q, row in enumerate(neighbours[name][:, :3])])
        rows[name] = {"s_per_image": round(seconds, 3), "images_per_s": round(1 / seconds, 3),
                      "z_relative_error": round(float(np.abs(z - reference_z).max() / np.abs(reference_z).max()), 4),
                      "same_study_top3": round(float(same_study), 4)}
        logger.info("%-10s %.3f s/image", name, seconds)
    for name in rows:
        rows[name] |= neighbour_agreement(neighbours[name], neighbours["f32"])
    baseline = "bf16" if "bf16" in rows else "f32"
    best_int8 = min((name for name in rows if name.startswith("int8")), key=lambda name: rows[name]["s_per_image"])
    speedup = rows[baseline]["s_per_image"] / rows[best_int8]["s_per_image"]
    adopted = speedup >= SPEEDUP_NEEDED and rows[best_int8]["queries_agreeing"] >= AGREEMENT_NEEDED
    result = {
        "benchmark": "int8",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, bf16={cpu_has_bf16()}",
        "openvino": ov.__version__,
        "nncf": nncf.__version__,
        "weights": args.weights,
        "input_size": args.size,
        "archive": f"{len(images)} synthetic chest radiographs in {args.studies} studies; "
                   f"{len(calibration)} calibration images of other studies",
        "quantise_s": round(quantise_s, 1),
        "rows": rows,
        "int8": best_int8,
        "speedup_vs_" + baseline: round(speedup, 3),
        "adopted": adopted,
        "rule": f"adopted if >= {SPEEDUP_NEEDED}x {baseline} and >= {AGREEMENT_NEEDED:.0%} of queries share >= 9 of "
                "fp32's top 10",
    }
    for name, row in rows.items():
        print(f"{name:<10} {row['s_per_image']:>7.3f} s/image  agreement {row['agreement']:.3f}  "
              f"queries agreeing {row['queries_agreeing']:.3f}  same study in top 3 {row['same_study_top3']:.3f}")
    print(f"{best_int8}: {speedup:.2f}x {baseline}; adopted: {adopted}")
    write_result(args.out, "int8-cpu", result)


if __name__ == "__main__":
    main()
