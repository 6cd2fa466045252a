#!/usr/bin/env bash
# One device call: the metagradient round in the code of 831e564 and in this tree's lean
# plan, side by side on one card, config by config (old, then new), then this tree's cuda
# rounds. From the repository root on the GPU machine, with an export of 831e564 (without
# bench/results) in $MGD_OLD_TREE (default .dev-lead/old):
#     MGD_COMMIT=<sha> bash experiments/lean_round/run_device.sh
# Writes $OUT/legacy.jsonl, $OUT/new_*/round_timing.csv, $OUT/summary.md, logs.
set -uo pipefail
OUT=${OUT:-/tmp/lean_round}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OLD=${MGD_OLD_TREE:-.dev-lead/old}
START=$(date +%s)
left() { echo $(( ${MGD_DEADLINE_S:-560} - ($(date +%s) - START) )); }

rm -rf /tmp/old831 && mkdir -p /tmp/old831 && cp -r "$OLD/mgd" /tmp/old831/ &&
  for d in pipeline reference bindings; do cp -r "$OLD/$d" /tmp/old831/mgd/; done
source scripts/device_setup.sh > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
{ echo "commit ${MGD_COMMIT:-unknown}; date $(date -u +%F)"; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; } > "$OUT/env.txt"
echo "build done after $(( $(date +%s) - START )) s"

legacy() {  # SHAPE IMPL
  [ "$(left)" -gt 60 ] || { echo "skip legacy $*: deadline"; return; }
  timeout $(( $(left) - 20 )) env PYTHONPATH=/tmp/old831:/tmp/site python3 \
    experiments/lean_round/legacy_round.py --shape "$1" --impl "$2" --repeats "${MGD_REPEATS:-3}" \
    2>>"$OUT/legacy.log" | grep '^RESULT' | cut -c8- >> "$OUT/legacy.jsonl"
}
new() {  # SHAPE IMPL PLAN
  [ "$(left)" -gt 60 ] || { echo "skip new $*: deadline"; return; }
  python3 -m bench.round_timing --shape "$1" --impls "$2" --plans "$3" --repeats "${MGD_REPEATS:-3}" \
    --child-timeout $(( $(left) - 20 )) --out "$OUT/new_${1/:/_}_$2_$3" >> "$OUT/new.log" 2>&1
}
# Configurations are SHAPE,IMPL words.
for cfg in ${MGD_LEAN_CONFIGS:-e2e:16384,pallas e2e:16384,standin gpt2s:8192,pallas}; do
  set -- ${cfg/,/ }
  legacy "$1" "$2"; new "$1" "$2" lean
  echo "$cfg done at $(( $(date +%s) - START )) s"
done
for cfg in ${MGD_NEW_ONLY:-e2e:16384,cuda gpt2s:8192,cuda}; do set -- ${cfg/,/ }; new "$1" "$2" lean; done
python3 experiments/lean_round/summarize.py "$OUT" | tee "$OUT/summary.md"
# Few files come back from the device: the per-configuration folders travel as one archive.
tar -C "$OUT" -czf /tmp/lean_round.tgz . && rm -rf "$OUT"/new_* "$OUT"/*.log && mv /tmp/lean_round.tgz "$OUT/lean_round.tgz"
