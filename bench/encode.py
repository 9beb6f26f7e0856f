"""Encoder throughput: medvae's own per-image path against ours, in one run on one machine.

Reference ("medvae"): what ``medvae_inference`` does per file, minus file I/O: the model built by
medvae's classes (LoRA injected, unfused attention), ``model(x, decode=False)`` on ONE image at a
time, fp32, posterior *sampled* (that is medvae's forward), S2 latent out.
Ours: :class:`retrieval.model.encoder.MedVAEEncoder` (LoRA folded, SDPA attention, channels_last, bf16
autocast where the device has bf16 units), batched, posterior mode, plus S2 + pooling.

Random seeded weights of the exact architecture (cost does not depend on weight values).
Prints a table and writes JSON to ``bench/results/``. Example::

    python -m bench.encode --device cpu --sizes 384 --ref-images 2 --images 8 --batch 4
    python -m bench.encode --device cuda --sizes 384,1024 --ref-images 20 --images 512 --batch 32,64 --compile
    python -m bench.encode --device cuda --sizes 384 --images 256 --batch 64 --compile --profile
    python -m bench.encode --device cuda --sizes 384 --images 512 --batch 64 --compile --cudnn-benchmark off,on
    python -m bench.encode --device cuda --sizes 384 --images 512 --batch 64 --precision bf16,bf16-weights

``--profile`` also runs two batches of each of our configurations under ``torch.profiler`` and writes the
operators by their own device time (CPU time on a CPU) to ``<out>/encode-profile-<device>-<path>-<size>-<batch>.txt``,
with the top ten in the row's ``profile_top``: where the encoder's time goes, for issue 18's item 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.results_io import write_result
from retrieval.config import Settings
from retrieval.model.encoder import MedVAEEncoder
from retrieval.model.pooling import parse_pooling, pool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_reference(size: int, images: int, device: torch.device) -> dict[str, Any]:
    """medvae's forward, one image at a time, fp32, as medvae_inference runs it."""
    encoder = MedVAEEncoder(
        Settings(weights="random", input_size=size, device=device.type, precision="fp32", compile="off", runtime="torch"),
        fold=False,
        fused_attention=False,
    )
    model = encoder.model.to(memory_format=torch.contiguous_format)
    x = torch.rand(1, 3, size, size, device=device) * 2 - 1
    _reset_peak(device)
    with torch.no_grad():
        model(x, decode=False)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(images):
            _, _, latent = model(x, decode=False)
            latent.cpu()
        _sync(device)
    seconds = (time.perf_counter() - start) / images
    return {"path": "medvae", "size": size, "batch": 1, "precision": "fp32", "ms_per_image": seconds * 1e3,
            "images_per_s": 1 / seconds, "peak_mb": _peak_memory_mb(device)}


def bench_ours(size: int, images: int, batch: int, device: torch.device, precision: str, compile_model: bool,
               runtime: str, data_dir: str, profile_to: str | None = None, cudnn_benchmark: bool = False) -> dict[str, Any]:
    torch.backends.cudnn.benchmark = cudnn_benchmark  # cuDNN times its algorithms per shape (CUDA only)
    encoder = MedVAEEncoder(
        Settings(weights="random", input_size=size, device=device.type, precision=precision, batch_size=batch,
                 compile="on" if compile_model else "off", runtime=runtime, data_dir=data_dir)  # compiled: this batch
    )
    spec = parse_pooling("spp:1,2,4")
    pixels = np.random.default_rng(0).random((batch, size, size), dtype=np.float32)
    if device.type == "cuda":
        pixels = torch.from_numpy(pixels).pin_memory()
    _reset_peak(device)
    for _ in range(2 if compile_model else 1):  # warm-up (compilation)
        pool(encoder.s2_latent(encoder.encode(pixels)), spec)
    _sync(device)
    steps = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(steps):
        pool(encoder.s2_latent(encoder.encode(pixels)), spec)
    _sync(device)
    seconds = (time.perf_counter() - start) / (steps * batch)
    compiled = "+compile" if encoder.compiled else "+compile-unusable" if compile_model else ""  # unusable: ran eager
    path = "ours" + compiled + ("+cudnn-bench" if cudnn_benchmark else "")
    row = {"path": path, "size": size, "batch": batch, "precision": encoder.precision_label, "cudnn_benchmark": cudnn_benchmark,
           "compile_cache": encoder.compile_cache,  # "unusable": the package crashed its test process, so this ran eager
           "ms_per_image": seconds * 1e3, "images_per_s": 1 / seconds, "peak_mb": _peak_memory_mb(device)}
    if profile_to is not None:
        row["profile_top"] = _profile(lambda: pool(encoder.s2_latent(encoder.encode(pixels)), spec), device,
                                      f"{profile_to}/encode-profile-{device.type}-{path.replace('+', '-')}-{row['precision']}-{size}-{batch}.txt")
    return row


def _profile(step: Any, device: torch.device, table_path: str) -> list[dict[str, Any]]:
    """Two ``step()`` calls under torch.profiler: the operator table (by own device time; CPU time on a CPU) to
    ``table_path``, and the top ten as ``[{"op", "self_ms", "calls"}]`` per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        _sync(device)
    events = prof.key_averages()
    own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(table_path).parent.mkdir(parents=True, exist_ok=True)
    Path(table_path).write_text(events.table(sort_by=own, row_limit=40))
    top = sorted(events, key=lambda event: getattr(event, own), reverse=True)[:10]
    return [{"op": event.key, "self_ms": round(getattr(event, own) / 1e3 / 2, 3), "calls": event.count // 2}
            for event in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="384")
    parser.add_argument("--ref-images", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", default="4")
    parser.add_argument("--precision", default="auto", help="RETRIEVAL_PRECISION, or several: bf16,bf16-weights")
    parser.add_argument("--compile", action="store_true", help="also measure the compiled encoder (AOTInductor package)")
    parser.add_argument("--runtime", default="auto", help="auto | torch | openvino (CPU; comma-separated to compare)")
    parser.add_argument("--data-dir", default="data", help="where the OpenVINO runtime caches its converted model")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--profile", action="store_true", help="also profile each of our configurations (see above)")
    parser.add_argument("--cudnn-benchmark", default="off",
                        help="off | on | off,on: torch.backends.cudnn.benchmark for our rows (CUDA: cuDNN picks the fastest "
                             "convolution algorithm per shape)")
    args = parser.parse_args()
    if unknown := sorted(set(args.cudnn_benchmark.split(",")) - {"off", "on"}):
        parser.error(f"--cudnn-benchmark: unknown value {', '.join(unknown)} (off, on)")
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        reference = bench_reference(size, args.ref_images, device)
        rows.append(reference)
        for batch, runtime in ((int(b), r) for b in args.batch.split(",") for r in args.runtime.split(",")):
            variants = [(precision, compiled, benchmark == "on") for precision in args.precision.split(",")
                        for compiled in ([False, True] if args.compile else [False])
                        for benchmark in args.cudnn_benchmark.split(",")]
            for precision, compiled, cudnn_benchmark in variants:
                try:
                    row = bench_ours(size, args.images, batch, device, precision, compiled, runtime, args.data_dir,
                                     profile_to=args.out if args.profile else None, cudnn_benchmark=cudnn_benchmark)
                except torch.OutOfMemoryError:
                    row = {"path": "ours", "size": size, "batch": batch, "error": "out of memory"}
                if "images_per_s" in row:
                    row["speedup_vs_medvae"] = row["images_per_s"] / reference["images_per_s"]
                rows.append(row)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "date": dt.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "rows": rows,
    }
    print(f"{'path':<28}{'size':>6}{'batch':>7}{'precision':>15}{'ms/img':>11}{'img/s':>10}{'peak MB':>10}{'speed-up':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['path']:<28}{row['size']:>6}{row['batch']:>7}  {row['error']}")
            continue
        print(f"{row['path']:<28}{row['size']:>6}{row['batch']:>7}{row['precision']:>15}{row['ms_per_image']:>11.1f}"
              f"{row['images_per_s']:>10.2f}{row['peak_mb']:>10.0f}{row.get('speedup_vs_medvae', 1.0):>10.1f}")
    path = write_result(args.out, f"encode-{device.type}", result)
    print(f"wrote {path} ({device_name}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
