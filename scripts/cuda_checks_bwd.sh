#!/usr/bin/env bash
# Device-side checks of the CUDA attention backward (dq, dk, dv), run on an H100/H200:
#   export CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON
#   source scripts/device_setup.sh && MGD_BUILD_DIR=build/device scripts/cuda_checks_bwd.sh
# Everything it writes goes under $OUT:
#   bwd_sass.txt       HGMMA / UTMALDG / LDL-STL / UBLKRED / REDG counts per backward kernel
#   bwd_driver.log     every output written and finite, two runs bitwise identical, fused
#                      (bulk and red) against deterministic; timing of the three
#   bwd_pytest.log     tests/test_cuda_backward.py and the grad-of-grad test of test_cuda.py
#   bwd_pytest_variants.log  tests/test_cuda_backward.py once per MGD_BWD_D64_BLOCKS_LIST entry
#   bwd_timing.log     impl cuda's backward (both modes) against Pallas, Triton and cuDNN through
#                      JAX (bench/kernel_bars.py)
#   bwd_sanitizer.log  compute-sanitizer memcheck and racecheck on small shapes
# Knobs: MGD_BWD_STEPS (default "sass driver pytest variants_pytest timing sanitizer"),
# MGD_TIMING_LENGTHS, MGD_BWD_D64_BLOCKS_LIST (default empty; e.g. "64x64 lean128",
# needs CMAKE_ARGS=-DMGD_BWD_D64_VARIANTS=ON): block variants of the bf16 D=64 backward that
# the driver step also checks and times (its bf16 D=64 cases, labeled [variant]) and the
# variants_pytest step tests, each with MGD_BWD_D64_BLOCKS set to it (the fused mode streams
# 64-query blocks in every variant but lean128).
set -uo pipefail
OUT=${OUT:-/tmp/mgd_checks}
mkdir -p "$OUT"
BUILD=${MGD_BUILD_DIR:-build/device}
PY=${PYTHON:-python3}
DRV=$BUILD/kernels/bwd_driver
STEPS=${MGD_BWD_STEPS:-"sass driver pytest variants_pytest timing sanitizer"}
LENGTHS=${MGD_TIMING_LENGTHS:-"1024 2048 4096 8192 16384 32768"}
VARIANTS=${MGD_BWD_D64_BLOCKS_LIST:-}
# Driver args: B T H D causal fp16 [iters] [dlse] [fused].
CASES=("1 1 1 64 1 0" "2 65 3 64 0 0 0 1" "2 1000 3 64 1 0 0 1" "1 200 2 128 1 0 0 1"
       "1 257 2 128 0 1" "1 1000 3 64 1 1 0 1" "2 4096 4 128 1 0" "1 1 1 64 1 0 0 0 1"
       "2 65 3 64 0 0 0 1 1" "2 1000 3 64 1 0 0 1 1" "1 333 2 64 0 0 0 0 1"
       "1 200 2 128 1 0 0 1 1" "1 1000 3 64 1 1 0 1 1" "2 4096 4 128 1 0 0 0 1"
       "1 333 2 128 0 1 0 0 1")

is_fused() { set -- $1; [ "${9:-0}" = 1 ]; }  # driver args: the 9th is fused
is_bf16_d64() { set -- $1; [ "$4" = 64 ] && [ "$6" = 0 ]; }

# driver_checks [BLOCKS]: every case (with BLOCKS, a D=64 block variant: the bf16 D=64 ones
# under MGD_BWD_D64_BLOCKS=BLOCKS), fused ones with both reductions, then the timings.
driver_checks() {
  local blocks=${1:-} lab=${1:+ [$1]} args bulk rc hd t
  for args in "${CASES[@]}"; do
    [ -n "$blocks" ] && ! is_bf16_d64 "$args" && continue
    for bulk in 1 0; do
      [ $bulk = 0 ] && ! is_fused "$args" && continue  # fused cases with both reductions
      env ${blocks:+MGD_BWD_D64_BLOCKS=$blocks} MGD_BWD_BULK_REDUCE=$bulk timeout 15 $DRV $args
      rc=$?
      [ $rc -ne 0 ] && echo "FAILED (rc $rc):${blocks:+ MGD_BWD_D64_BLOCKS=$blocks} MGD_BWD_BULK_REDUCE=$bulk $args"
      [ $rc -eq 124 ] && { echo "kernel hangs: stopping the checks here"; exit 1; }
    done
  done
  echo "-- timing${lab} (CUDA events, bf16, causal, B=1; 5 products halved)"
  for hd in "12 64" "16 128"; do
    set -- $hd
    [ -n "$blocks" ] && [ "$2" != 64 ] && continue
    for t in $LENGTHS; do
      env ${blocks:+MGD_BWD_D64_BLOCKS=$blocks} timeout 30 $DRV 1 $t $1 $2 1 0 20 0 0 | tail -1 |
        sed "s/^/T=$t H=$1 D=$2$lab deterministic: /"
      env ${blocks:+MGD_BWD_D64_BLOCKS=$blocks} timeout 60 $DRV 1 $t $1 $2 1 0 20 0 1 | tail -1 |
        sed "s/^/T=$t H=$1 D=$2$lab fused bulk:    /"
      env ${blocks:+MGD_BWD_D64_BLOCKS=$blocks} MGD_BWD_BULK_REDUCE=0 timeout 60 $DRV 1 $t $1 $2 1 0 20 0 1 |
        tail -1 | sed "s/^/T=$t H=$1 D=$2$lab fused red:     /"
    done
  done
}

# sanitize BLOCKS ARGS...: memcheck and racecheck of each driver case (BLOCKS, when not
# empty, a D=64 block variant), fused cases with both reductions.
sanitize() {
  local blocks=$1 tool args bulk
  shift
  for tool in memcheck racecheck; do
    for args in "$@"; do
      for bulk in 1 0; do
        [ $bulk = 0 ] && ! is_fused "$args" && continue
        echo "-- $tool${blocks:+ MGD_BWD_D64_BLOCKS=$blocks} MGD_BWD_BULK_REDUCE=$bulk $args"
        env ${blocks:+MGD_BWD_D64_BLOCKS=$blocks} MGD_BWD_BULK_REDUCE=$bulk timeout 60 \
          compute-sanitizer --tool $tool --print-limit 10 $DRV $args 2>&1 | tail -3
      done
    done
  done
}

for step in $STEPS; do
  case $step in
  sass)
    LIB=$(find $BUILD -name 'libmgd_cuda.so' | head -1)
    cuobjdump --dump-sass "$LIB" 2>/dev/null |
      awk '/Function :/ {name=$3} /HGMMA/ {h[name]++} /UTMALDG/ {t[name]++} /LDL|STL/ {l[name]++}
           /UBLKRED/ {u[name]++} /REDG/ {r[name]++}
           END {for (n in h) if (n ~ /bwd_/) printf "%-90s HGMMA %4d UTMALDG %3d LDL/STL %3d UBLKRED %d REDG %d\n", n, h[n], t[n], l[n], u[n], r[n]}' |
      tee "$OUT/bwd_sass.txt" ;;
  driver)
    {
      driver_checks
      for blocks in $VARIANTS; do
        echo "-- MGD_BWD_D64_BLOCKS=$blocks: the bf16 D=64 cases"
        driver_checks "$blocks"
      done
    } 2>&1 | tee "$OUT/bwd_driver.log"
    grep -q "kernel hangs" "$OUT/bwd_driver.log" && exit 1 ;;
  pytest)
    { timeout ${MGD_PYTEST_TIMEOUT:-200} $PY -m pytest tests/test_cuda_backward.py -q -x -p no:cacheprovider
      timeout 120 $PY -m pytest tests/test_cuda.py -q -x -p no:cacheprovider -k "grad_of_grad or long_causal_sequence"
    } 2>&1 | tee "$OUT/bwd_pytest.log" | grep -E "passed|failed|error|Error|assert" | tail -20 ;;
  variants_pytest)
    for blocks in $VARIANTS; do
      echo "== MGD_BWD_D64_BLOCKS=$blocks: tests/test_cuda_backward.py"
      MGD_BWD_D64_BLOCKS=$blocks timeout ${MGD_PYTEST_TIMEOUT:-200} $PY -m pytest \
        tests/test_cuda_backward.py -q -x -p no:cacheprovider
    done 2>&1 | tee -a "$OUT/bwd_pytest_variants.log" | grep -E "^==|passed|failed|error|Error|assert" |
      tail -20 ;;
  timing)
    timeout ${MGD_TIMING_TIMEOUT:-150} $PY -m bench.kernel_bars --out "$OUT/jax" --stages backward \
      --lengths $LENGTHS 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT/bwd_timing.log" ;;
  sanitizer)
    {
      sanitize "" "1 130 1 128 1 0 0 1" "1 70 2 64 0 1" "1 130 1 128 1 0 0 1 1" "1 70 2 64 0 1 0 0 1" \
                  "1 200 2 128 0 0 0 0 1" "1 200 2 64 1 0 0 0 1"
      # Each listed bf16 D=64 variant: a split and a fused case with several blocks.
      for blocks in $VARIANTS; do
        sanitize "$blocks" "1 333 2 64 1 0" "1 333 2 64 1 0 0 1 1"
      done
    } 2>&1 | tee "$OUT/bwd_sanitizer.log" ;;
  esac
done
