#!/usr/bin/env bash
# The GPU check, rehearsed before any device is lent: bench/gpu_check.sh --dry-run in a virtual environment shaped
# like the device image (docs/performance.md, "The GPU check").
#
#   bench/gpu_rehearsal.sh        # here, with network; ~3 minutes the first time (the venv is kept and reused)
#
# 1. A venv of CPython 3.12 (the image's) with torch 2.11.0 and torchvision 0.26.0 (the image's versions) and only
#    the packages aqa needs that bench/gpu_image_packages.txt (the image's list) names; the script fails if pip
#    brings in anything the image does not have. torch comes from PyPI with --no-deps: its CUDA libraries are
#    gigabytes, and on a CPU only their sonames must load, so the venv links the nvidia/ folder of an environment
#    that has them (CUDA_LIBS_FROM, default the site-packages of $PYTHON, the project's venv) and pip installs
#    nvidia-* wheels only when none is found (the image has all of them).
# 2. The carried wheels (bench/gpu_wheels.sh fills .whl/ when it is empty), installed as on the device:
#    --no-index --no-deps --target.
# 3. What would travel to the device (tracked files, untracked files git does not ignore, .whl/) against 64 MiB.
# 4. bench/gpu_check.sh --dry-run with that interpreter, aqa on PYTHONPATH (not installed), an empty AQA_HOME
#    (the device has no weights), no PyAV, no pytorchvideo.
# The figures go to bench/out/gpu-rehearsal/ (report.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${REHEARSAL_DIR:-$REPO/bench/out/gpu-rehearsal}
VENV=$WORK/venv
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then  # the first CPython 3.12 that runs (a pyenv shim may exist and refuse)
    for candidate in $(command -v python3.12 || true) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        "$candidate" -c 'import venv' 2>/dev/null && { PY312=$candidate; break; }
    done
fi
HOST_PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$WORK"
REPORT=$WORK/report.txt
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }
[ -x "$PY312" ] || { echo "gpu_rehearsal: no CPython 3.12 found; set PYTHON312" >&2; exit 2; }

norm() { tr 'A-Z_.' 'a-z--' | sed 's/\[.*//'; }
IMAGE=$(grep -v '^#' bench/gpu_image_packages.txt | cut -d= -f1 | norm | sort -u)
pin() { grep -i "^$1==" bench/gpu_image_packages.txt || echo "$1"; }

if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    "${PIP[@]}" --no-deps "$(pin torch)" "$(pin torchvision)"
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    CUDA_FROM=${CUDA_LIBS_FROM:-$("$HOST_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        2>/dev/null || true)}
    if [ -d "$CUDA_FROM/nvidia" ]; then
        ln -s "$CUDA_FROM/nvidia" "$SITE/nvidia"
    else
        "${PIP[@]}" --no-deps nvidia-cudnn-cu13 nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvshmem-cu13 \
            nvidia-cublas nvidia-cuda-runtime nvidia-cufft nvidia-cufile nvidia-cuda-cupti nvidia-curand \
            nvidia-cusolver nvidia-cusparse nvidia-nvjitlink nvidia-cuda-nvrtc nvidia-nvtx
    fi
    # torch's own needs, then aqa's (pyproject.toml) less decord, av and pytorchvideo, then the check's. Older than
    # today's releases where those need what the image lacks (its own are older): typer 0.29 needs pydantic,
    # python-dateutil 3+ needs tzdata.
    "${PIP[@]}" filelock typing-extensions 'setuptools<82' sympy networkx jinja2 fsspec "$(pin numpy)" \
        "$(pin safetensors)" 'typer<0.29' 'python-dateutil<3' rich pandas pillow matplotlib scipy pytest \
        opencv-python-headless
    touch "$VENV/.complete"
fi
installed() { "$VENV/bin/python" -m pip list --format=freeze --exclude pip 2>/dev/null; }
EXTRA=$(comm -23 <(installed | cut -d= -f1 | norm | sort -u) <(echo "$IMAGE"))
if [ -n "$EXTRA" ]; then
    say "gpu_rehearsal: the venv holds packages the image lacks: $EXTRA"
    rm -f "$VENV/.complete"  # rebuilt on the next run
    exit 1
fi
versions=$("$VENV/bin/python" -c 'import sys, torch; print("python", sys.version.split()[0] + ", torch", torch.__version__)')
say "venv: $versions, $(installed | wc -l) packages, all on the image's list"
for m in av pytorchvideo decord; do
    "$VENV/bin/python" -c "import $m" 2>/dev/null && { say "gpu_rehearsal: $m is importable in the venv"; exit 1; }
done

compgen -G ".whl/*.whl" >/dev/null || PYTHON="$HOST_PY" bench/gpu_wheels.sh >/dev/null
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
total=$((tracked + ${untracked:-0} + wheels))
say "carried: tracked $tracked B + untracked $((${untracked:-0})) B + .whl $wheels B ($(ls .whl | tr '\n' ' '))" \
    "= $total B = $(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB of 64 MiB"
[ "$total" -le "$LIMIT" ] || { say "gpu_rehearsal: over the 64 MiB that travel"; exit 1; }

home=$(mktemp -d); out=$(mktemp -d); site=$(mktemp -d)
trap 'rm -rf "$home" "$out" "$site"' EXIT
started=$(date +%s)
set +e
env -u VIRTUAL_ENV PYTHON="$VENV/bin/python" WHEEL_SITE="$site" AQA_HOME="$home" OUT="$out" PYTHONPATH= \
    bench/gpu_check.sh --dry-run 2>&1 | tee "$WORK/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
cp "$out"/*.md "$out"/*.txt "$out"/*.log "$WORK/" 2>/dev/null || true
tests=$(grep -hE '[0-9]+ (passed|skipped)' "$out/gpu_tests.log" | tail -1)
say "gpu_check.sh --dry-run: exit $status in $(($(date +%s) - started)) s; tests: $tests"
exit "$status"
