#!/usr/bin/env bash
# The pipeline's GPU measurements, for a call of its own after scripts/gpu_run.sh:
# the demo preset, the metagradient round at GPT-2-small scale for every attention
# implementation (and L=2048 with the fastest), and the end-to-end bench.
#
# Here first: scripts/fetch_device_wheels.sh (wheels in .whl/, corpus in .mgd-data/).
# On the lent H200 (device tool), carrying .whl and .mgd-data:
#     bash scripts/gpu_pipeline.sh [demo|oracle|e2e ...]   (default: all three)
# Each part has its own time cap; everything lands under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/mgd_gpu_pipeline}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MGD_COMMIT=${MGD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
{ echo "date: $(date -u +%FT%TZ)"; echo "commit: $MGD_COMMIT"; echo "command: bash scripts/gpu_pipeline.sh $*";
  nvidia-smi --query-gpu=name,driver_version --format=csv; } > "$OUT/env.txt" 2>&1
source scripts/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
parts=${*:-demo oracle e2e}
for part in $parts; do
  case $part in
    demo)
      MGD_DATA_DIR=.mgd-data timeout -s INT "${MGD_DEMO_S:-540}" python3 -m mgd.cli run --preset demo \
        --out runs/demo --no-progress > "$OUT/demo.log" 2>&1
      tar -C runs/demo -czf "$OUT/demo_report.tgz" --exclude='_ckpt' --exclude='*.npz' . ;;
    oracle)
      timeout -s INT "${MGD_ORACLE_S:-540}" python3 -m mgd.pipeline.bench_oracle \
        --out "$OUT/oracle.json" --impls cuda,pallas,triton,xla --long 2048 \
        > "$OUT/oracle.log" 2>&1 ;;
    e2e)
      MGD_BENCH_JSONL="$OUT/e2e.jsonl" timeout -s INT "${MGD_E2E_S:-400}" python3 -m pytest bench \
        -m "gpu and e2e" -p no:cacheprovider -q -rs --benchmark-json "$OUT/e2e.json" \
        > "$OUT/e2e.log" 2>&1 ;;
    *) echo "unknown part: $part (demo, oracle, e2e)"; exit 2 ;;
  esac
  echo "[$part] $(tail -n 1 "$OUT/$part.log" 2>/dev/null)"
done
