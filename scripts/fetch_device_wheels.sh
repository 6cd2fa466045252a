#!/usr/bin/env bash
# Download, here, the pure-Python or manylinux wheels the GPU machine lacks
# (Python 3.12, x86-64, no network there). They land in .whl/, which git ignores
# and the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  jax-triton==0.3.1 nvidia-cutlass==4.2.0.0 nvtx==0.2.17 "$@"
ls -la .whl
