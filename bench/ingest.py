"""End-to-end ingest throughput from generated folders of PNG and DICOM, and where the time goes.

Generates realistic radiographs (default 2048x2048, 16-bit: synthetic chest look-alikes with
noise, so PNG compression behaves like on real images), ingests them into a fresh SQLite data dir
with :class:`retrieval.ingest.pipeline.IngestPipeline` (decode workers overlapping the encoder), and
reports images/s, the split decode (summed worker CPU) / encode / database+index write, the
encoder's busy fraction of the wall time, peak RSS, and stored bytes per image against the
source files. ``--scale`` runs the same folder kind at N and 10N images in separate processes and
compares peak RSS (memory must stay flat as the archive grows). ``--warm-start`` ingests each folder
twice, each time in a new process and a new data dir (as on a new machine; inductor's cache lives in the data
dir's compile cache, decision 34), the second time with the first one's compile cache folder
(``retrieval/model/compile_cache.py``) copied into its data dir:
rows ``"cache": "cold"`` and ``"warm"``, whose ``load`` seconds are the start-up cost (issue 18, item 3).
``--compile-cache DIR`` keeps the compiled packages in DIR across rows and runs, so that only the first compiles.
``--fit-device cpu,encoder`` ingests each folder once per ``RETRIEVAL_INGEST_FIT_DEVICE``: the decode workers'
CPU per image with and without the mapping and fitting, which ``encoder`` moves to the encoder's device
(``device_fit_ms_per_image``: what that costs the pipeline's thread; on a GPU, issuing the work).
``--kind dicom-j2k`` writes the same DICOM as JPEG 2000 lossless, and ``--frame-decoder cpu,nvimgcodec`` ingests it once
per ``RETRIEVAL_INGEST_FRAME_DECODER``: decoded by the workers (pydicom) or passed on and decoded on the GPU by
nvImageCodec (decision 39; the rows' ``device_fit`` counts the frames it decoded and those it refused).

    python -m bench.ingest --kind png,dicom --count 64 --size 2048
    python -m bench.ingest --kind dicom --count 50 --scale
    python -m bench.ingest --kind png --count 64 --device cuda --warm-start
    python -m bench.ingest --kind png,dicom --count 32 --fit-device cpu,encoder
    python -m bench.ingest --kind dicom --count 128 --device cuda --fit-device cpu,encoder --compile-cache /tmp/cc
    python -m bench.ingest --kind dicom-j2k --count 128 --device cuda --frame-decoder cpu,nvimgcodec
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_io import write_result


def _write_one(task: tuple[str, str, int, int]) -> int:
    from PIL import Image

    from retrieval.ops.sample import study_variant, synthetic_chest

    kind, path, seed, size = task
    rng = np.random.default_rng(seed)
    pixels = (synthetic_chest(rng, size, variant=study_variant(rng)) * 4095).astype(np.uint16)
    if kind == "png":
        Image.fromarray(pixels).save(path, compress_level=6)
    else:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.PatientID, ds.BodyPartExamined, ds.ViewPosition = "DX", f"P{seed % 97}", "CHEST", "PA"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels.tobytes()
        if kind == "dicom-j2k":  # JPEG 2000 lossless (OpenJPEG through imagecodecs), one fragment
            import imagecodecs
            from pydicom.encaps import encapsulate
            from pydicom.uid import JPEG2000Lossless

            meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PixelData = encapsulate([imagecodecs.jpeg2k_encode(pixels, codecformat="J2K")])
            ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    return os.path.getsize(path)


def _variant_of(kind: str, source: Path, target: Path, number: int) -> int:
    """A copy of ``source`` that ingest does not skip as a duplicate, with the same pixels: a PNG with a tEXt chunk
    after its header (another sha256), a DICOM with new instance UIDs. Returns its size."""
    if kind == "png":
        data = source.read_bytes()
        text = b"Comment\x00copy " + str(number).encode()
        chunk = len(text).to_bytes(4, "big") + b"tEXt" + text + zlib.crc32(b"tEXt" + text).to_bytes(4, "big")
        header_end = 8 + 25  # the signature, then IHDR: length, type, 13 bytes, CRC
        target.write_bytes(data[:header_end] + chunk + data[header_end:])
    else:
        import pydicom
        from pydicom.uid import generate_uid

        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.save_as(target, enforce_file_format=True)
    return target.stat().st_size


def generate(kind: str, folder: Path, count: int, size: int, workers: int, unique: int = 0) -> int:
    """Write ``count`` images into ``folder`` (``unique`` > 0: that many drawn, the rest copies of them that differ
    only in a tag, so a long run is not bound by drawing 2048² images); returns total bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "png" if kind == "png" else "dcm"  # dicom, dicom-j2k
    paths = [folder / f"s{i // 4:05d}" / f"img_{i:06d}.{suffix}" for i in range(count)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    drawn = min(count, unique) if unique > 0 else count
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        total = sum(pool.map(_write_one, [(kind, str(paths[i]), i, size) for i in range(drawn)], chunksize=4))
    return total + sum(_variant_of(kind, paths[i % drawn], paths[i], i) for i in range(drawn, count))


def run_ingest(folder: Path, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.config import Settings
    from retrieval.ingest.pipeline import IngestPipeline
    from retrieval.service import SpaceService

    settings = Settings(
        data_dir=data_dir, weights="random", input_size=args.input_size, batch_size=args.batch,
        decode_workers=args.workers, device=args.device, compile=args.compile, ingest_fit_device=args.fit_device,
        ingest_frame_decoder=args.frame_decoder,
    )
    service = SpaceService(settings)
    report = IngestPipeline(service).run(folder)
    service.close()
    db_bytes = sum(p.stat().st_size for p in data_dir.glob("retrieval.db*"))
    index_bytes = sum(p.stat().st_size for p in (data_dir / "index").glob("*"))
    seconds = report.seconds
    return {
        "images": report.ingested,
        "failed": report.failed,
        "images_per_s": report.images_per_second,
        "seconds": seconds,
        "encoder_busy_fraction": seconds["encode"] / seconds["wall"] if seconds["wall"] else 0.0,
        "decode_cpu_ms_per_image": 1e3 * seconds["decode_cpu"] / max(report.ingested, 1),
        "fit_device": args.fit_device,
        "frame_decoder": args.frame_decoder,
        "device_fit": report.as_dict()["device_fit"],
        "device_fit_ms_per_image": 1e3 * seconds.get("device_fit", 0.0) / max(report.device_frames, 1),
        "peak_rss_mb_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mb_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "stored_bytes_per_image": (db_bytes + index_bytes) / max(report.ingested, 1),
        "device": str(service.encoder.device),
        "precision": service.encoder.precision_label,
        "cache": service.encoder.compile_cache,  # None when the encoder is not compiled
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="png,dicom")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--input-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="RETRIEVAL_COMPILE")
    parser.add_argument("--fit-device", default="auto", help="RETRIEVAL_INGEST_FIT_DEVICE, or several: cpu,encoder")
    parser.add_argument("--frame-decoder", default="auto",
                        help="RETRIEVAL_INGEST_FRAME_DECODER for compressed DICOM (kind dicom-j2k), or several: cpu,nvimgcodec")
    parser.add_argument("--unique", type=int, default=0,
                        help="draw only this many images, the rest tagged copies with the same pixels (0: all drawn)")
    parser.add_argument("--warm-start", action="store_true", help="each folder twice: without, then with, a compile cache")
    parser.add_argument("--compile-cache", default="", metavar="DIR",
                        help="a compile-cache folder kept across runs: copied into each data dir first (but a --warm-start "
                             "cold row's), and each run's packages copied back into it (one compile per bench, not per row)")
    parser.add_argument("--scale", action="store_true", help="compare peak RSS at count and 10x count")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="", help="result file: <out>/<name>-<date>.json (default ingest-<device>)")
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process of --scale: one ingest, JSON on stdout
        print(json.dumps(run_ingest(Path(args.one[0]), Path(args.one[1]), args)))
        return
    gen_workers = max(1, (os.cpu_count() or 2) - 1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kind.split(","):
            counts = [args.count, 10 * args.count] if args.scale else [args.count]
            for count in counts:
                folder = Path(tmp) / f"{kind}-{count}"
                tick = time.perf_counter()
                source_bytes = generate(kind, folder, count, args.size, gen_workers, args.unique)
                generated = time.perf_counter() - tick
                starts = ["cold", "warm"] if args.warm_start else [""]
                runs = [(fit, codec, start) for fit in args.fit_device.split(",") for codec in args.frame_decoder.split(",")
                        for start in starts]
                for fit, codec, start in runs:
                    data_dir = Path(tmp) / f"data-{kind}-{count}-{fit}-{codec}{'-' + start if start else ''}"
                    if start == "warm":  # a new data dir holding only the cold start's compile cache
                        shutil.copytree(Path(tmp) / f"data-{kind}-{count}-{fit}-{codec}-cold" / "compile-cache",
                                        data_dir / "compile-cache")
                    elif start == "" and args.compile_cache and Path(args.compile_cache).is_dir():
                        shutil.copytree(args.compile_cache, data_dir / "compile-cache")
                    # inductor's cache is kept in the data dir's compile-cache (decision 34): none from an earlier run
                    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
                    child = subprocess.run(
                        [sys.executable, "-m", "bench.ingest", "--one", str(folder), str(data_dir), "--input-size",
                         str(args.input_size), "--batch", str(args.batch), "--workers", str(args.workers), "--device",
                         args.device, "--compile", args.compile, "--fit-device", fit, "--frame-decoder", codec],
                        capture_output=True, text=True, check=True, env=env,
                    )
                    row = json.loads(child.stdout.strip().splitlines()[-1])
                    if args.compile_cache and (data_dir / "compile-cache").is_dir():
                        shutil.copytree(data_dir / "compile-cache", args.compile_cache, dirs_exist_ok=True)
                    row.update(kind=kind, count=count, size=args.size, unique=args.unique or count,
                               source_bytes_per_image=source_bytes / count,
                               generate_seconds=generated)
                    rows.append(row)
    print(f"{'kind':<10}{'count':>7}{'fit':>8}{'frames by':>11}{'cache':>6}{'load s':>8}{'img/s':>9}{'decode ms/img':>15}{'encode s':>10}{'write s':>9}{'wall s':>8}"
          f"{'enc busy':>10}{'RSS MB':>8}{'stored B/img':>14}{'source B/img':>14}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['kind']:<10}{r['count']:>7}{r['fit_device']:>8}{r['frame_decoder']:>11}{r['cache'] or '-':>6}{s.get('load', 0.0):>8.1f}{r['images_per_s']:>9.1f}{r['decode_cpu_ms_per_image']:>15.1f}{s['encode']:>10.1f}"
              f"{s['write']:>9.1f}{s['wall']:>8.1f}{r['encoder_busy_fraction']:>10.2f}{r['peak_rss_mb_main']:>8.0f}"
              f"{r['stored_bytes_per_image']:>14.0f}{r['source_bytes_per_image']:>14.0f}")
    if args.scale:
        for kind, fit in [(kind, fit) for kind in args.kind.split(",") for fit in args.fit_device.split(",")]:
            small, large = [r for r in rows if (r["kind"], r["fit_device"]) == (kind, fit) and r["cache"] != "warm"][:2]
            growth = large["peak_rss_mb_main"] / small["peak_rss_mb_main"] - 1
            print(f"{kind} (fit {fit}): peak RSS {small['peak_rss_mb_main']:.0f} MB at {small['count']} -> "
                  f"{large['peak_rss_mb_main']:.0f} MB at {large['count']} images ({growth:+.1%})")
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine()
    result = {"date": dt.date.today().isoformat(), "device": device, "cpus": os.cpu_count(), "rows": rows}
    path = write_result(args.out, args.name or f"ingest-{'cuda' if torch.cuda.is_available() else 'cpu'}", result)
    print(f"wrote {path} ({device})")


if __name__ == "__main__":
    main()
