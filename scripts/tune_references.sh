#!/usr/bin/env bash
# Autotune the reference kernels on the GPU and rewrite their tables in place.
#
# On the lent H200, from the repository root, after the setup:
#     source scripts/device_setup.sh && bash scripts/tune_references.sh
# then, in the same call, the benchmark (it reads the tables just written).
#
# Two parts, each under its own hard cap (`timeout`; SIGINT first, so a part
# stopped by its cap still leaves every key it finished; what it never reached
# falls back to the kernels' defaults):
#   triton  (MGD_TUNE_TRITON_S, default 135 s): every Triton kernel, head dims
#           64 and 128: causal T=4096 and 16384, non-causal T=4096, causal T=1024;
#           the grid is compiled in parallel first and pruned by compile
#           statistics (reference/triton/autotune.py).
#   pallas  (MGD_TUNE_PALLAS_S, default 60 s): the non-causal entries of the
#           Pallas table (medium range, T=4096), merged into the causal ones.
# About 200 s in all. Writes reference/triton/configs.{json,csv} and
# reference/pallas/configs.{json,csv} in place, and under $OUT:
#   tune_configs.tgz  those four files, paths relative to the repository root
#                     (tar -xzf tune_configs.tgz -C <repo> puts them back)
#   tune_logs.tgz     the two sweep logs
set -uo pipefail
OUT=${OUT:-/tmp/mgd_tune}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
logs=$(mktemp -d)

triton_s=${MGD_TUNE_TRITON_S:-135}
pallas_s=${MGD_TUNE_PALLAS_S:-60}

stamp "triton autotune (cap ${triton_s} s)"
# The in-process budget stops between configs a little before the hard cap.
timeout -s INT -k 15 "$triton_s" $PY -m mgd.reference.triton.autotune \
  --out reference/triton/configs.json --budget-s $(( triton_s - 12 )) --precompile-s 45 \
  > "$logs/tune_triton.log" 2>&1
stamp "triton: exit $? / $(tail -n 1 "$logs/tune_triton.log")"

stamp "pallas autotune, non-causal (cap ${pallas_s} s)"
timeout -s INT -k 15 "$pallas_s" $PY -m mgd.reference.pallas.autotune \
  --out reference/pallas/configs.json --causal full --ranges medium --heads 16x128,12x64 \
  --reps 5 --min-seconds 0.03 --budget-s $(( pallas_s - 15 )) \
  > "$logs/tune_pallas.log" 2>&1
stamp "pallas: exit $? / $(tail -n 1 "$logs/tune_pallas.log")"

tar -czf "$OUT/tune_configs.tgz" reference/triton/configs.json reference/triton/configs.csv \
  reference/pallas/configs.json reference/pallas/configs.csv
tar -C "$logs" -czf "$OUT/tune_logs.tgz" tune_triton.log tune_pallas.log
rm -rf "$logs"
stamp "done: $OUT/tune_configs.tgz, $OUT/tune_logs.tgz"
