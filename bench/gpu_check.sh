#!/usr/bin/env bash
# One GPU check, everything in one go (under 8 minutes on one H100/H200):
#   1. the tests marked `gpu` (they skip without CUDA everywhere else);
#   2. bench/bench_gpu.py: model-only clips/s of VST and I3D in fp32 and bf16 at batch 1, 8 and 32,
#      decode alone against end to end on a generated 3-minute 1280x720 video, and `aqa score` end to end.
# The table goes to $OUT (the device machine's return folder) when it is set, else bench/out/gpu.
#
#   bench/gpu_check.sh             # on the GPU machine, carrying .whl (bench/gpu_wheels.sh fills it)
#   bench/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU with tiny models, in seconds
#   bench/gpu_rehearsal.sh         # here: the dry run in a venv shaped like the GPU image (torch 2.11, its packages)
#
# It runs on the device image as it is: its python3 and packages (torch 2.11, not the project's pin: aqa is put on
# PYTHONPATH, never pip-installed, so nothing is resolved against pyproject.toml), plus the wheels in .whl/
# (decord), installed with --no-index --no-deps into $WHEEL_SITE (default /tmp/site). No PyAV or pytorchvideo
# there: aqa imports them only where used; decord decodes and OpenCV writes the test video.
# The `aqa score` row needs the converted I3D weights in $AQA_HOME (bench/out/aqa-home/weights is used when
# present); they do not fit in the 64 MiB that travel with the tracked files and the wheels, so on the device
# machine that row says it was skipped. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/out/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -z "${AQA_HOME:-}" ] && [ -d bench/out/aqa-home/weights ] && export AQA_HOME="$PWD/bench/out/aqa-home"
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${WHEEL_SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check: the carried wheels in .whl/ do not install into $SITE" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
# What the image must provide, checked first: one line naming what is missing, not a traceback minutes later.
"$PY" - <<'PYEOF' 2>&1 | tee "$DEST/environment.txt" || exit 2
import importlib.util, sys
need = ["torch", "torchvision", "numpy", "typer", "rich", "pandas", "PIL", "safetensors", "matplotlib", "scipy",
        "pytest", "cv2", "decord"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)}: run bench/gpu_wheels.sh here and carry .whl")
import torch, aqa_cli.cli
from aqa_cli.video import available_decoders
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"decoders {available_decoders()}")
PYEOF

# Time caps: tight on the GPU machine (its minutes are counted), loose for the dry run on a shared CPU.
if [ "${1:-}" = "--dry-run" ]; then
    DEVICE=cpu; BENCH_ARGS=(--dry-run); CAP_TESTS=600; CAP_BENCH=900
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared CPU: no thread team waiting on a preempted partner
else
    DEVICE=cuda; BENCH_ARGS=(--seconds 180 --batches 1 8 32); CAP_TESTS=120; CAP_BENCH=360
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || { echo "gpu_check: torch sees no CUDA device; run it on a GPU machine (or pass --dry-run)" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$DEST/nvidia-smi.txt"
fi
status=0
echo "== tests marked gpu" >&2
timeout "$CAP_TESTS" "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$DEST/gpu_tests.log" || status=1
echo "== bench_gpu.py" >&2
timeout "$CAP_BENCH" "$PY" bench/bench_gpu.py --device "$DEVICE" --out "$DEST" "${BENCH_ARGS[@]}" 2>&1 \
    | tee "$DEST/bench_gpu.log" || status=1
exit $status
