#!/usr/bin/env bash
# Experiment parts for a GPU machine, run after `scripts/gpu_run.sh demo` in the same
# warm session: the demo's scorer stages again with other settings, each on a copy of
# the finished demo run (same corpus, base model, labels and baselines; only the
# features, the scorer and the distilled selection's training are redone), and a
# bfloat16 snapshot of the run for study on CPU (experiments/run_snapshot.py).
#
#     bash experiments/demo_variants.sh [VARIANT ...]     (no VARIANT: all of them)
#
# VARIANTs:
#   gradient   --set scorer.gradient_alignment=true
#   modes      --set selection.target_modes=M for M in $MGD_DEMO_MODES (4 16)
#   rules      the earlier selection rules: no gate (--set selection.target_gate=0), and the plain
#              top k (--set selection.target_modes=0 --set selection.target_gate=0)
#   snapshot   the run's base model, Adam second moment and scorer features in bfloat16
#              (10, 10 and 14 MiB for the demo) under $OUT/snapshot
#
# The copy uses pipeline.run.copy_for_scorer_variant and the flags are `mgd run`'s as of
# commit 831e564; adapt them when the CLI changes. Each variant is capped at
# $MGD_VARIANT_CAP_S (300) seconds.
set -uo pipefail
OUT=${OUT:-/tmp/mgd_demo_variants}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
base=${MGD_RUNS_DIR:-runs}/demo
[ -n "${MGD_DEVICE_SETUP_DONE:-}" ] || source scripts/device_setup.sh > "$OUT/setup.log" 2>&1 \
  || { cat "$OUT/setup.log"; exit 1; }
if [ ! -f "$base/results.csv" ]; then
  echo "no finished demo run in $base: run scripts/gpu_run.sh demo first" >&2
  exit 1
fi

variant() {  # NAME FLAG...: the demo's scorer stages again with the FLAGs
  local name=$1 run_dir=${MGD_RUNS_DIR:-runs}/demo-$1
  shift
  rm -rf "$run_dir"
  python3 -c "import sys; from mgd.pipeline.run import copy_for_scorer_variant as c; c(*sys.argv[1:])" \
    "$base" "$run_dir" || { echo "demo_$name: copy failed"; return 0; }
  echo "demo_$name: $*"
  timeout -s INT -k 10 "${MGD_VARIANT_CAP_S:-300}" env MGD_DATA_DIR=.mgd-data \
    python3 -m mgd.cli run --preset demo "$@" --out "$run_dir" --no-progress \
    > "$OUT/demo_$name.log" 2>&1
  echo "demo_$name: exit $?"
  [ -d "$run_dir" ] && tar -C "$run_dir" -czf "$OUT/demo_${name}_run.tgz" --exclude='_ckpt' \
    --exclude='*.npz' --exclude='continued-*' --exclude='select-*' --exclude='population*' \
    --exclude='corpus' --exclude='base' --exclude='oracle' --exclude='tokenizer_cache' .
  (cd "$run_dir" 2>/dev/null && tar -czf "$OUT/demo_${name}_scores.tgz" scorer/scores.npz) || true
}

for v in ${*:-gradient modes rules snapshot}; do
  case $v in
    gradient) variant gradient --set scorer.gradient_alignment=true ;;
    modes) for m in ${MGD_DEMO_MODES:-4 16}; do variant "modes$m" --set "selection.target_modes=$m"; done ;;
    rules) variant nogate --set selection.target_gate=0; variant topk --set selection.target_modes=0 --set selection.target_gate=0 ;;
    snapshot) python3 experiments/run_snapshot.py pack "$base" "$OUT/snapshot" ;;
    *) echo "unknown variant: $v (gradient modes rules snapshot)"; exit 2 ;;
  esac
done
