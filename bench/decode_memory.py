"""Memory of concurrent large decodes: peak and resident set after three 80-Mpx PNGs decoded at once.

Each arm runs in a fresh process (so peaks do not mix): ``gate`` is the service as it is (large
decodes one at a time through ``retrieval.imaging.decode_gate``, memory trimmed after each);
``no-gate`` lifts the threshold so all three decode together and nothing is trimmed, which is
how decoding behaved before the gate. Prints a table and writes JSON to ``bench/results/``.

    python -m bench.decode_memory [--threads 3] [--rounds 4] [--side 8944]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results_io import write_result


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def run_arm(png: str, threads: int, rounds: int, gate: bool) -> dict[str, float]:
    """Decode ``png`` in ``threads`` threads at once in this process; RSS figures in MiB."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.imaging import decode_gate
    from retrieval.imaging.decode import decode_path

    if not gate:
        decode_gate.LARGE_DECODE_VALUES = 1 << 62
    before = _status_kib("VmRSS")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):  # repeated rounds, as a server sees them (glibc raises its mmap threshold)
            shapes = list(pool.map(lambda _: decode_path(png, max_pixels=80_000_000).pixels.shape, range(threads)))
            assert all(shape == shapes[0] for shape in shapes)
    return {
        "rss_before_mib": before / 1024,
        "peak_mib": _status_kib("VmHWM") / 1024,
        "rss_after_mib": _status_kib("VmRSS") / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--side", type=int, default=8944, help="square side of the PNG (8944^2 = 80 Mpx)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--arm", choices=["gate", "no-gate"], help=argparse.SUPPRESS)
    parser.add_argument("--png", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # a child: one arm, JSON on stdout
        print(json.dumps(run_arm(args.png, args.threads, args.rounds, args.arm == "gate")))
        return

    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "large.png"
        Image.new("L", (args.side, args.side), 9).save(png)  # tiny file, huge declared size
        arms = {}
        for arm in ("no-gate", "gate"):
            done = subprocess.run(
                [sys.executable, "-m", "bench.decode_memory", "--arm", arm, "--png", str(png), "--threads", str(args.threads),
                 "--rounds", str(args.rounds)],
                capture_output=True, text=True, check=True,
            )
            arms[arm] = json.loads(done.stdout)
        file_kib = png.stat().st_size / 1024
    print(f"{args.rounds} rounds of {args.threads} concurrent decodes of a {file_kib:.0f} KiB PNG declaring {args.side}x{args.side} px")
    print(f"{'arm':8} {'before MiB':>10} {'peak MiB':>9} {'after MiB':>9}")
    for arm, row in arms.items():
        print(f"{arm:8} {row['rss_before_mib']:10.0f} {row['peak_mib']:9.0f} {row['rss_after_mib']:9.0f}")
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
        "threads": args.threads,
        "rounds": args.rounds,
        "side": args.side,
        "arms": arms,
        "peak_ratio_no_gate_over_gate": arms["no-gate"]["peak_mib"] / arms["gate"]["peak_mib"],
    }
    print(f"wrote {write_result(args.out, 'decode-memory', result)}")


if __name__ == "__main__":
    main()
