"""Cost of the semantic head (``pooling=biomedclip``) beside the MedVAE encoder, per image, in one run.

BiomedCLIP (seeded random weights of the exact architecture: the cost does not depend on the
values) runs on stage-2 latents of MedVAE's shape at 384 px (4 x 48 x 48): the loss's transform
(resize to 224) and the ViT-B/16 image tower. Measured per image at batch 1 and at the ingest
batch, in fp32 and under bf16 autocast; the text tower per query (one prompt: padded to open_clip's
256-token context, and as ``embed_texts`` runs it, the padding cut); and
MedVAE's encoder (seeded random ``medvae_8_4_2d``, this project's CPU runtime) on the same machine
for the ratio. FLOPs are counted with ``torch.utils.flop_counter``. Prints the figures and writes
JSON to ``bench/results/``.

    python -m bench.semantic [--device cpu|cuda] [--batch 32] [--repeats 3] [--no-encoder]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.results_io import write_result
from retrieval.config import ClipSettings, Settings
from retrieval.model.biomedclip import latent_clip_input, load_clip


def per_image_ms(run: Callable[[], object], images: int, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``run`` (after one warm-up), per image, in ms."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return round(best * 1e3 / images, 2)


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def gflop(run: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return round(counter.get_total_flops() / 1e9, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-encoder", action="store_true", help="skip MedVAE's encoder (the ratio's other side)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    clip = load_clip(ClipSettings(weights="random"), device)
    s2 = torch.randn(args.batch, 4, 48, 48)
    one = s2[:1]

    def head(latents: torch.Tensor, bf16: bool) -> Callable[[], object]:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        def run() -> object:
            with torch.inference_mode(), autocast:
                return clip.model.encode_image(latent_clip_input(latents).to(device))
        return run

    figures: dict[str, float] = {"image_tower_gflop": gflop(head(one, False))}
    for precision in ("fp32", "bf16"):
        figures[f"head_{precision}_batch1_ms"] = per_image_ms(head(one, precision == "bf16"), 1, args.repeats)
        figures[f"head_{precision}_batch{args.batch}_ms"] = per_image_ms(head(s2, precision == "bf16"), args.batch,
                                                                        args.repeats)
    tokens = clip.tokenizer(["right pleural effusion"]).to(device)

    def padded_text() -> object:  # open_clip's own call: padded to the 256-token context
        with torch.inference_mode():
            return clip.model.encode_text(tokens)

    def text() -> object:  # ours: the padding cut (the same embedding)
        return clip.embed_texts(["right pleural effusion"])

    figures["text_tower_padded_gflop"] = gflop(padded_text)
    figures["text_tower_gflop"] = gflop(text)
    figures["text_query_padded_fp32_ms"] = per_image_ms(padded_text, 1, args.repeats)
    figures["text_query_fp32_ms"] = per_image_ms(text, 1, args.repeats)
    if not args.no_encoder:
        from retrieval.model.encoder import MedVAEEncoder

        data_dir = Path(tempfile.mkdtemp(prefix="bench-semantic-"))  # the OpenVINO conversion's cache
        encoder = MedVAEEncoder(Settings(data_dir=data_dir, weights="random", input_size=384, device=args.device,
                                         id_secret="bench"))
        pixels = np.random.default_rng(0).random((1, 384, 384), dtype=np.float32) * 2 - 1
        figures["encoder_ms"] = per_image_ms(lambda: encoder.encode(pixels), 1, args.repeats)
        figures["head_bf16_share_of_encoder"] = round(figures[f"head_bf16_batch{args.batch}_ms"] / figures["encoder_ms"], 3)
        runtime = encoder.precision_label
    for name, value in figures.items():
        print(f"{name:32} {value}")
    result = {"date": dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "device": str(device), "torch_threads": torch.get_num_threads(), "batch": args.batch,
              "encoder_runtime": None if args.no_encoder else runtime, **figures}
    print(f"wrote {write_result(args.out, f'semantic-{device.type}', result)}")


if __name__ == "__main__":
    main()
