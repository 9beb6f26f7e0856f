#!/usr/bin/env bash
# Issue 18's GPU figures in one device run, prepared so that a session
# lent a GPU spends its 15 device minutes measuring, not setting up. Writes every result under $OUT (or
# bench/results when OUT is unset) and prints a summary.
#
# Here, once per session (the wheels travel in .whl/, as the device tool's README says):
#   echo /.whl/ >> .git/info/exclude && bash bench/gpu_session.sh --download
# Then, with the device tool, the call below that runs each step on its own (carry=[".whl"], timeout_s=580). On
# 2026-11-30 (H200) that call took 493 s with steps 2-5 crashing in the compiled encoder (since then tried in a child
# process first, decision 34): the start and that call left 6 of the 15 device minutes. A lease that has to rerun
# one step had better split the steps over two calls (STEPS="1 2 3", then "4 5").
# Rehearse the CPU half here first (small sizes, the same steps):  DEVICE=cpu bash bench/gpu_session.sh
#
# Steps: (1) the device fit (decisions 35, 36) against the Pillow fit on the GPU, from [0, 1] pixels and from stored
# 16-bit values with a DICOM window; (2) bench/encode.py: medvae's
# reference, ours eager and ours compiled (AOTInductor, decision 34) at batch 64, each under bf16 autocast and with bf16
# weights (decision 37), each profiled (item 2: where its time goes; cuDNN's algorithm search changed nothing on
# 2026-11-30, so it is not repeated); (3) bench/ingest.py on 2048²
# 16-bit PNG with a cold and a warm start (load seconds: the <= 10 s target); (4) uncompressed DICOM, mapped and
# fitted by the decode workers (cpu) and on the GPU (encoder), both loading step 3's compiled package.
# Ingest on the GPU maps and fits there (RETRIEVAL_INGEST_FIT_DEVICE auto, decision 36): its rows' device_fit
# says how many frames came through shared memory. (5) bench/api.py: a 2048² 16-bit PNG upload searched over
# HTTP, micro-batched (item 4's p50 <= 20 ms); last, and allowed to fail without losing the rest.
# (6) compressed DICOM (decision 39): nvImageCodec's decode of JPEG 2000, HTJ2K and JPEG Lossless frames of 8, 12 and 16
# bits against the pixels encoded, and bench/ingest.py on JPEG 2000 DICOM decoded by the workers and on the GPU; it
# needs the codec wheels: `bash bench/gpu_session.sh --download-codec` here, then, right after a call that ran steps
# 1-5 (its /tmp/site), a call with carry=[".whl-codec"] and STEPS=6.
# STEPS="2 3" runs only those steps (default: the first five). One device call that keeps each step's failure from stopping the
# rest and brings every file back in one archive (the tool returns at most 8 files), stopping itself before the call's limit:
#   D=$OUT; export OUT=/tmp/res; mkdir -p $OUT; timeout -k 5 510 bash -c 'for s in 1 2 3 4 5; do STEPS=$s bash
#   bench/gpu_session.sh || echo "STEP $s FAILED"; done' >$OUT/log 2>&1; grep -v USDT $OUT/log; tar czf $D/res.tgz -C $OUT .
set -euo pipefail
cd "$(dirname "$0")/.."

# the versions installed here by `pip install -e .` (2026-11-30); the GPU machine has torch 2.11 and none of these
WHEELS=(medvae==0.1.7 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 sqlalchemy==2.1.9
        alembic==1.20.1 mako==1.4.3 faiss-cpu==1.15.1 pydicom==3.0.2
        fastapi==0.165.0 fastapi-offline==1.7.7 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
        opentelemetry-api==1.45.2  # this row: `retrieval serve` for step 5
        imagecodecs==2026.3.6)  # libdeflate for PNG (decision 38): 26 MB; all of them 55 MB, 59 with the repository (64 MiB max)
# step 6 only (decision 39), 33 MB: carried in a call of its own (carry=[".whl-codec"]) right after a call that installed
# the wheels above (the machine keeps /tmp/site while it is warm: 30 s idle)
CODEC_WHEELS=(nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.2.3.58 nvidia-nvjpeg2k-cu13==0.11.0.51)

if [ "${1:-}" = "--download" ] || [ "${1:-}" = "--download-codec" ]; then
  if [ "$1" = "--download" ]; then folder=.whl; wanted=("${WHEELS[@]}"); else folder=.whl-codec; wanted=("${CODEC_WHEELS[@]}"); fi
  for wheel in "${wanted[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$folder" "$wheel"
  done
  du -sh "$folder"
  exit 0
fi

DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-1 2 3 4 5}"  # 6 only when asked: it needs .whl-codec
step() { [[ " $STEPS " == *" $1 "* ]]; }
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1  # a crash prints every thread's Python stack
if [ -d .whl ] && [ "$DEVICE" = "cuda" ]; then  # once per machine (STEPS=1, STEPS=2, ... in turn install once)
  [ -d /tmp/site/medvae ] ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -d .whl-codec ] && [ "$DEVICE" = "cuda" ]; then  # step 6: nvImageCodec with nvJPEG and nvJPEG 2000, one folder
  [ -d /tmp/site-codec/nvidia/nvimgcodec ] ||
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-codec .whl-codec/*.whl
  export PYTHONPATH=/tmp/site-codec:${PYTHONPATH:-$PWD}
fi
if [ "$DEVICE" = "cuda" ]; then
  # 1,024 images to ingest, 128 of them drawn (2026-11-30: drawing 128 2048² PNGs took 42 s there; 128 images were
  # too few to see the pipeline's steady state)
  SIZE=384 IMAGES=1024 BATCH=64 COUNT=1024 UNIQUE=128 SOURCE=2048 WORKERS=15 API_SECONDS=20
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
else  # the CPU rehearsal: every step, at sizes that finish in a few minutes on 2 cores
  SIZE=64 IMAGES=4 BATCH=2 COUNT=4 UNIQUE=2 SOURCE=256 WORKERS=1 API_SECONDS=3
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if step 1; then
echo "== 1. device fit against the Pillow fit"
python3 - "$DEVICE" "$OUT" <<'EOF'
import json, sys
import numpy as np, torch
from retrieval.imaging.device_fit import stretch_to_square as on_device
from retrieval.imaging.preprocess import stretch_to_square
from retrieval.ops.sample import study_variant, synthetic_chest
device, out = torch.device(sys.argv[1]), sys.argv[2]
rng, errors = np.random.default_rng(0), {}
for shape in ((2048, 2048), (2500, 2048), (512, 640), (200, 400)):
    pixels = synthetic_chest(rng, max(shape), variant=study_variant(rng))[: shape[0], : shape[1]].copy()
    fitted = on_device(pixels, 384, device).cpu().numpy()
    errors["x".join(map(str, shape))] = float(np.abs(fitted - stretch_to_square(pixels, 384)).max())
from retrieval.imaging.decode import UnitMap, apply_window
from retrieval.imaging.device_fit import fit_frame
stored = (synthetic_chest(rng, 2048, variant=study_variant(rng)) * 4095).astype(np.uint16)
window = UnitMap(kind="window", slope=1.0, intercept=-1024.0, center=800.0, width=2400.0, invert=True)
cpu = stretch_to_square(1.0 - apply_window(stored.astype(np.float32) - 1024, center=800.0, width=2400.0), 384)
errors["stored-2048-window"] = float(np.abs(fit_frame(stored, window, 384, device).cpu().numpy() - cpu).max())
print(json.dumps(errors))
json.dump({"device": str(device), "max_abs_error": errors}, open(f"{out}/device-fit-{device.type}.json", "w"), indent=2)
assert max(errors.values()) < 1e-4, errors
EOF
fi

step 2 && echo "== 2. encoder: medvae's path, ours eager, ours compiled (AOTInductor)" &&
python3 -m bench.encode --device "$DEVICE" --sizes "$SIZE" --ref-images 4 --images "$IMAGES" --batch "$BATCH" \
  --compile --runtime torch --data-dir /tmp/encode-data --profile --precision bf16,bf16-weights --out "$OUT"

step 3 && echo "== 3. ingest, 16-bit PNG, cold then warm start" &&
python3 -m bench.ingest --kind png --count "$COUNT" --unique "$UNIQUE" --size "$SOURCE" --input-size "$SIZE" --batch "$BATCH" \
  --workers "$WORKERS" --device "$DEVICE" --compile on --warm-start --compile-cache /tmp/compile-cache \
  --out "$OUT" --name "ingest-png-$DEVICE"

step 4 && echo "== 4. ingest, uncompressed DICOM, fitted by the decode workers and on the GPU (step 3's compile cache)" &&
python3 -m bench.ingest --kind dicom --count "$COUNT" --unique "$UNIQUE" --size "$SOURCE" --input-size "$SIZE" --batch "$BATCH" \
  --workers "$WORKERS" --device "$DEVICE" --compile on --fit-device cpu,encoder --compile-cache /tmp/compile-cache \
  --out "$OUT" --name "ingest-dicom-$DEVICE"
if step 5; then
  echo "== 5. search over HTTP with a 2048² 16-bit PNG upload (micro-batching: auto, on with CUDA)"
  python3 -m bench.api --clients 1,4 --seconds "$API_SECONDS" --input-size "$SIZE" --image-size "$SOURCE" \
    --out "$OUT" --name "api-$DEVICE" || echo "step 5 failed (the results above stand)"
fi
if step 6; then
  echo "== 6. compressed DICOM: nvImageCodec's frames against the pixels encoded, then ingest decoded by the workers and on the GPU"
  python3 - "$DEVICE" "$OUT" <<'EOF'
import json, sys, time
import imagecodecs, numpy as np, torch
from retrieval.imaging.decode import EncodedFrame
from retrieval.imaging.device_codec import open_device_codec
from retrieval.ops.sample import study_variant, synthetic_chest
device, out = torch.device(sys.argv[1]), sys.argv[2]
codec = open_device_codec("nvimgcodec" if device.type == "cuda" else "auto", device)
rng, rows = np.random.default_rng(0), []
for bits in (8, 12, 16):
    pixels = (synthetic_chest(rng, 2048, variant=study_variant(rng)) * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
    streams = {"1.2.840.10008.1.2.4.90": imagecodecs.jpeg2k_encode(pixels, codecformat="J2K"),  # OpenJPEG, lossless
               "1.2.840.10008.1.2.4.201": imagecodecs.htj2k_encode(pixels),  # OpenJPH, lossless
               "1.2.840.10008.1.2.4.70": imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits)}
    for syntax, data in streams.items():
        frame = EncodedFrame(syntax, bytes(data), 2048, 2048, 8 if bits == 8 else 16, bits)
        row = {"syntax": syntax, "bits": bits, "bytes": len(data)}
        try:
            if codec is None:
                raise RuntimeError("no codec on the CPU: the rehearsal checks the script only")
            decoded = codec.decode(frame).cpu().numpy()
            torch.cuda.synchronize()
            tick = time.perf_counter()
            for _ in range(10):
                codec.decode(frame)
            torch.cuda.synchronize()
            row.update(equal=bool(np.array_equal(decoded, pixels)), ms_per_frame=100 * (time.perf_counter() - tick))
        except Exception as exc:  # a refusal is a finding (the pipeline would decode it on the CPU), not a stop
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(json.dumps(row))
json.dump({"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "rows": rows},
          open(f"{out}/device-codec-{device.type}.json", "w"), indent=2)
EOF
  python3 -m bench.ingest --kind dicom-j2k --count "$COUNT" --unique "$UNIQUE" --size "$SOURCE" --input-size "$SIZE" \
    --batch "$BATCH" --workers "$WORKERS" --device "$DEVICE" --compile on --fit-device encoder \
    --frame-decoder "cpu,$([ "$DEVICE" = cuda ] && echo nvimgcodec || echo auto)" --compile-cache /tmp/compile-cache \
    --out "$OUT" --name "ingest-dicom-j2k-$DEVICE"
fi
ls -l "$OUT"
