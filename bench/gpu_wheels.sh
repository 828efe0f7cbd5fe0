#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU machine beyond its image (docs/performance.md, "The GPU check"):
# decord alone. The image has torch 2.11, torchvision, numpy, OpenCV, pytest and the rest of aqa's needs, but no
# decord, PyAV or pytorchvideo, and nothing can be installed there from a registry. PyAV's wheel (35 MB) would not
# fit in the 64 MiB that travel with the tracked files; aqa runs without it (decord decodes, OpenCV writes the test
# video) and without pytorchvideo (only the zoo backbones need it).
#
#   bench/gpu_wheels.sh            # here, with network: fills .whl/ (ignored by git), prints the sizes
#
# Then on the GPU machine: carry .whl, and start the command with bench/gpu_check.sh (it installs .whl/*.whl into
# /tmp/site itself, --no-index --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# decord 0.6.0's wheel is py3-none-manylinux2010: one file for every CPython 3.
WHEELS=(decord==0.6.0)
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"
du -b .whl/*.whl
