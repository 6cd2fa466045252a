#!/usr/bin/env bash
# One device call, about a minute: a GPU profile of one metagradient round by kernel
# (experiments/lean_round/profile_round.py). From the repository root on the GPU machine:
#     bash experiments/lean_round/profile_device.sh [SHAPE] [IMPL]     (default e2e:16384 standin)
# Writes $OUT/profile/{profile.md,profile.json,perfetto_trace.json.gz,round_hlo.txt.gz}
# and $OUT/run.log: five files, within what the device returns.
set -uo pipefail
OUT=${OUT:-/tmp/profile_round}
SHAPE=${1:-e2e:16384}
IMPL=${2:-standin}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
START=$(date +%s)
if [ "${MGD_DEVICE_SETUP_DONE:-}" != 1 ]; then
  # Only impl=cuda needs the CUDA extension; skipping its build saves minutes.
  [ "$IMPL" = cuda ] || export MGD_NO_CUDA=1
  source scripts/device_setup.sh > "$OUT/run.log" 2>&1 || { tail -40 "$OUT/run.log"; exit 1; }
fi
echo "setup done after $(( $(date +%s) - START )) s" | tee -a "$OUT/run.log"
timeout "${MGD_PROFILE_TIMEOUT_S:-300}" python3 experiments/lean_round/profile_round.py \
  --shape "$SHAPE" --impl "$IMPL" --plan lean --rounds 2 --hlo --out "$OUT/profile" 2>>"$OUT/run.log"
echo "exit $? after $(( $(date +%s) - START )) s" | tee -a "$OUT/run.log"
