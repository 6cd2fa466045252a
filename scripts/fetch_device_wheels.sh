#!/usr/bin/env bash
# Download, here, the pure-Python or manylinux wheels the GPU machine lacks
# (Python 3.12, x86-64, no network there). They land in .whl/, which git ignores
# and the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  jax-triton==0.3.1 nvidia-cutlass==4.2.0.0 nvtx==0.2.17 \
  nltk==3.10.4 perplexity-correlations==0.1.2 data-selection==1.0.3 "$@"
# The pipeline's demo reads the offline corpus from .mgd-data/ (../shared does not
# travel to the device); carry it with .whl.
if [ -d ../shared/data ]; then
  mkdir -p .mgd-data && cp ../shared/data/*.jsonl.gz .mgd-data/
  grep -qx '/.mgd-data/' .git/info/exclude 2>/dev/null || echo '/.mgd-data/' >> .git/info/exclude
fi
ls -la .whl
