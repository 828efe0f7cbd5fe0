#!/usr/bin/env bash
# One GPU check, everything in one go (about 5-8 minutes on one H100/H200):
#   1. the tests marked `gpu` (they skip without CUDA everywhere else);
#   2. bench/bench_gpu.py: model-only clips/s of VST and I3D in fp32 and bf16 at batch 1, 8 and 32,
#      decode alone against end to end on a generated 3-minute 1280x720 video, and `aqa score` end to end.
# The table goes to $OUT (the device machine's return folder) when it is set, else bench/out/gpu.
#
#   bench/gpu_check.sh             # on the GPU machine
#   bench/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU with tiny models, in seconds
#
# The GPU machine cannot download: for the `aqa score` row, carry the converted I3D weights
# (cp ~/.cache/aqa/weights/i3d-kinetics400.* bench/out/aqa-home/weights/, then carry bench/out/aqa-home);
# without them that row says it was skipped. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/out/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -z "${AQA_HOME:-}" ] && [ -d bench/out/aqa-home/weights ] && export AQA_HOME="$PWD/bench/out/aqa-home"

# Time caps: tight on the GPU machine (its minutes are counted), loose for the dry run on a shared CPU.
if [ "${1:-}" = "--dry-run" ]; then
    DEVICE=cpu; BENCH_ARGS=(--dry-run); CAP_TESTS=600; CAP_BENCH=900
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a shared CPU: no thread team waiting on a preempted partner
else
    DEVICE=cuda; BENCH_ARGS=(--seconds 180 --batches 1 8 32); CAP_TESTS=150; CAP_BENCH=420
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
