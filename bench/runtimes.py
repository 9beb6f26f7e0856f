"""CPU runtimes for the encoder: PyTorch (ours) against ONNX Runtime and OpenVINO, same weights.

The encoder that :class:`retrieval.model.encoder.MedVAEEncoder` runs (LoRA folded, SDPA attention;
``encoder`` + ``quant_conv`` -> posterior mode) is exported to ONNX once, then timed in each
runtime on the same batch, and each output is compared with PyTorch fp32 (max absolute error
relative to the latent's range). Random seeded weights of the exact architecture. Needs the
optional packages ``onnx``, ``onnxscript``, ``onnxruntime`` and ``openvino`` (not project
dependencies; missing ones are reported and skipped). Prints a table, writes JSON::

    python -m bench.runtimes --size 384 --batch 4 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.model.encoder import MedVAEEncoder, cpu_has_bf16
from retrieval.model.openvino_runtime import PosteriorMode


def _time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = run()  # warm-up (and first-call compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        out = run()
    return (time.perf_counter() - start) / repeats, out


def _relative_error(out: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(out - reference).max() / (np.abs(reference).max() + 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = MedVAEEncoder(Settings(weights="random", input_size=args.size, device="cpu", precision="fp32", compile="off",
                                     runtime="torch"))
    module = PosteriorMode(encoder.model).eval()
    pixels = np.random.default_rng(0).random((args.batch, args.size, args.size), dtype=np.float32)
    x = encoder.to_model_input(pixels).contiguous()
    rows: list[dict[str, Any]] = []

    def record(name: str, precision: str, seconds: float, out: np.ndarray, reference: np.ndarray | None) -> None:
        rows.append({"runtime": name, "precision": precision, "ms_per_image": seconds / args.batch * 1e3,
                     "images_per_s": args.batch / seconds,
                     "max_rel_error_vs_torch_fp32": None if reference is None else _relative_error(out, reference)})

    with torch.inference_mode():
        seconds, reference = _time(lambda: module(x.contiguous(memory_format=torch.channels_last)).numpy(), args.repeats)
        record("pytorch", "fp32", seconds, reference, None)
        if cpu_has_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                seconds, out = _time(lambda: module(x.contiguous(memory_format=torch.channels_last)).float().numpy(),
                                     args.repeats)
            record("pytorch", "bf16-autocast", seconds, out, reference)

    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "encoder.onnx"
        if importlib.util.find_spec("onnx") is None:
            rows.append({"runtime": "onnx export", "error": "onnx is not installed"})
        else:
            tick = time.perf_counter()
            torch.onnx.export(module, (x,), str(onnx_path), input_names=["x"], output_names=["z"],
                              opset_version=18, dynamo=True, dynamic_shapes=None)
            size_mb = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20  # graph + external weights
            print(f"exported ONNX in {time.perf_counter() - tick:.1f}s ({size_mb:.0f} MB)")
            feed = x.numpy()
            if importlib.util.find_spec("onnxruntime") is None:
                rows.append({"runtime": "onnxruntime", "error": "not installed"})
            else:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
                seconds, out = _time(lambda: session.run(None, {"x": feed})[0], args.repeats)
                record(f"onnxruntime {ort.__version__}", "fp32", seconds, out, reference)
            if importlib.util.find_spec("openvino") is None:
                rows.append({"runtime": "openvino", "error": "not installed"})
            else:
                import openvino as ov

                core = ov.Core()
                for hint in ("f32", "bf16"):
                    compiled = core.compile_model(str(onnx_path), "CPU", {
                        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": args.threads,
                        "PERFORMANCE_HINT": "THROUGHPUT" if args.batch > 1 else "LATENCY"})
                    request = compiled.create_infer_request()
                    seconds, out = _time(lambda r=request: r.infer({0: feed})[0].copy(), args.repeats)
                    record(f"openvino {ov.__version__.split('-')[0]}", hint, seconds, out, reference)

    torch_row = rows[0]
    for row in rows:
        if "images_per_s" in row:
            row["vs_pytorch_fp32"] = row["images_per_s"] / torch_row["images_per_s"]
    result = {"date": dt.date.today().isoformat(), "device": platform.processor() or platform.machine(),
              "cpu_bf16": cpu_has_bf16(), "threads": args.threads, "size": args.size, "batch": args.batch,
              "torch": torch.__version__, "rows": rows}
    print(f"{'runtime':<22}{'precision':>15}{'ms/img':>10}{'img/s':>9}{'vs torch fp32':>15}{'max rel err':>13}")
    for row in rows:
        if "error" in row:
            print(f"{row['runtime']:<22}  {row['error']}")
            continue
        error = row["max_rel_error_vs_torch_fp32"]
        print(f"{row['runtime']:<22}{row['precision']:>15}{row['ms_per_image']:>10.0f}{row['images_per_s']:>9.3f}"
              f"{row['vs_pytorch_fp32']:>15.2f}{'-' if error is None else f'{error:.2e}':>13}")
    print(f"wrote {write_result(args.out, 'runtimes-cpu', result)}")


if __name__ == "__main__":
    main()
