#!/usr/bin/env bash
# Nsight Compute summaries of our kernels (clocks left as found: --clock-control none),
# one text file per driver call under $OUT/ncu/: speed of light, compute and memory
# workload, warp stalls, occupancy, launch statistics, and the tensor-pipe metrics this
# ncu knows (looked up with --query-metrics, so an unknown name never aborts a profile).
#
#     OUT=dir bash scripts/ncu_kernels.sh       (needs the drivers: CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON)
#
# Shapes: bf16, causal, B=1, T=$MGD_NCU_T (8192), (H, D) = (16, 128), and (12, 64) for the forward
# and the split backward.
set -uo pipefail
OUT=${OUT:-/tmp/mgd_ncu}
BUILD=${MGD_BUILD_DIR:-build/device}/kernels
T=${MGD_NCU_T:-8192}
mkdir -p "$OUT/ncu"
command -v ncu > /dev/null || { echo "ncu: not found"; exit 0; }

chip=$(ncu --list-chips 2>/dev/null | tr ', ' '\n\n' | grep -m1 -i '^gh100' || echo gh100)
ncu --query-metrics --chip "$chip" 2>/dev/null | awk '{print $1}' \
  | grep -E 'pipe_tensor_op_(gmma|hmma)_cycles_active$|inst_executed_pipe_tensor_op_gmma$' \
  > "$OUT/ncu/tensor_metrics.txt"
metrics=$(sed 's/$/.avg.pct_of_peak_sustained_active/' "$OUT/ncu/tensor_metrics.txt" | paste -sd, -)

profile() {  # name launches driver args...
  local name=$1 count=$2; shift 2
  local drv=$BUILD/$1; shift
  [ -x "$drv" ] || { echo "$name: no $drv" | tee "$OUT/ncu/$name.txt"; return; }
  {
    echo "# $name: $(basename "$drv") $*  (first $count kernel launches)"
    timeout 120 ncu --clock-control none --launch-count "$count" \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats \
      ${metrics:+--metrics "$metrics"} "$drv" "$@"
  } > "$OUT/ncu/$name.txt" 2>&1
  echo "$name: exit $?, $(grep -c 'Section: GPU Speed Of Light' "$OUT/ncu/$name.txt") kernels profiled"
}

# The drivers' first launches are their checked runs (iters=1 times one more).
profile fwd_d128 1 fwd_driver 1 "$T" 16 128 1 0
profile fwd_d64 1 fwd_driver 1 "$T" 12 64 1 0
profile bwd_split_d128 3 bwd_driver 1 "$T" 16 128 1 0
profile bwd_fused_d128 3 bwd_driver 1 "$T" 16 128 1 0 0 0 1
profile bwd_split_d64 3 bwd_driver 1 "$T" 12 64 1 0
profile dbwd_d128 4 dbwd_driver 1 "$T" 16 128 1 0
