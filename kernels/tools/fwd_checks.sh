#!/usr/bin/env bash
# Device-side checks of the CUDA forward (run on the Hopper machine, after
#   export CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON; source scripts/device_setup.sh):
#   fwd_driver.log     every output written and finite, sampled rows vs float64, the same
#                      bits under every schedule (MGD_FWD_PERSISTENT, _MAX_CTAS, _PINGPONG)
#   fwd_timing.log     kernel times (CUDA events), bf16 causal B=1, (16,128) and (12,64),
#                      persistent off/on x ping-pong off/on
#   fwd_sanitizer.log  compute-sanitizer memcheck, racecheck, synccheck on small shapes
#   fwd_pytest.log     tests/test_cuda_forward.py (and MGD_FWD_EXTRA_TESTS) on the GPU
#   fwd_jax.log        forward through JAX: cuda vs Pallas, Triton and cuDNN (bench/kernel_bars.py)
# Usage: kernels/tools/fwd_checks.sh   Knobs: MGD_BUILD_DIR, MGD_FWD_LENGTHS, MGD_FWD_JAX_LENGTHS,
#   MGD_FWD_PYTEST_TIMEOUT, MGD_FWD_EXTRA_TESTS (pytest node ids or -k expressions),
#   MGD_FWD_ONLY (sections to run, default "driver timing sanitizer pytest jax"),
#   MGD_FWD_BASE_DRIVER (another build's fwd_driver, timed beside this one, lines "[base]").
set -uo pipefail
OUT=${OUT:-/tmp/mgd_fwd_checks}
mkdir -p "$OUT"
DRV=${MGD_BUILD_DIR:-build/device}/kernels/fwd_driver
PY=${PYTHON:-python3}
[ -x "$DRV" ] || { echo "no $DRV: build with CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON"; exit 1; }
want() { [[ " ${MGD_FWD_ONLY:-driver timing sanitizer pytest jax} " == *" $1 "* ]]; }

# Schedules: one CTA per tile, persistent (one CTA per SM), persistent capped at 3 CTAs
# (many tiles of different key-block counts per CTA even on small shapes).
SCHEDULES=("MGD_FWD_PERSISTENT=0" "MGD_FWD_PERSISTENT=1" "MGD_FWD_PERSISTENT=1 MGD_FWD_MAX_CTAS=3")

if want driver; then
echo "== driver: written, finite, sampled rows vs float64, equal across schedules =="
# D=64 tiles are 192 rows (three consumer warpgroups): T=191, 193, 383, 385 and 1000
# put tails on either side of a tile boundary, some with a warpgroup wholly past T.
# The last four shapes have more tiles than an H100 has SMs (two with T % 128 != 0).
for args in "1 1 1 64 1 0" "2 65 3 64 0 0" "1 200 2 128 1 0" "1 257 2 128 0 1" "1 1000 3 64 1 1" \
            "2 777 2 64 0 0" "1 191 2 64 1 0" "1 193 2 64 1 1" "2 193 3 64 0 0" "1 383 2 64 0 1" \
            "2 385 3 64 1 0" "1 1000 5 64 0 0" "2 4096 4 128 1 0" "1 4097 2 128 0 1" \
            "2 4096 16 128 1 0" "2 4096 16 64 0 1" "3 1000 16 128 1 1" "4 1100 33 64 1 0"; do
  sums=""
  for sched in "${SCHEDULES[@]}"; do
    for pp in 0 1; do
      line=$(env $sched MGD_FWD_PINGPONG=$pp timeout 30 $DRV $args 2>&1); rc=$?
      echo "[$sched pingpong=$pp] $line"
      sums="$sums ${line##*checksum }"
      [ $rc -eq 0 ] || echo "FAILED (rc $rc): $args"
      [ $rc -eq 124 ] && { echo "kernel hangs ($sched pingpong=$pp): stopping here"; exit 1; }
    done
  done
  [ "$(printf '%s\n' $sums | sort -u | wc -l)" -eq 1 ] || echo "FAILED: schedules differ bitwise: $args"
done 2>&1 | tee "$OUT/fwd_driver.log"
grep -q "kernel hangs" "$OUT/fwd_driver.log" && exit 1
fi

if want timing; then
echo "== kernel timing (CUDA events), bf16 causal B=1 =="
for hd in "16 128" "12 64"; do
  set -- $hd
  for t in ${MGD_FWD_LENGTHS:-1024 2048 4096 8192 16384 32768}; do
    for pers in 0 1; do
      for pp in 0 1; do
        MGD_FWD_PERSISTENT=$pers MGD_FWD_PINGPONG=$pp timeout 60 $DRV 1 $t $1 $2 1 0 20 | tail -1 \
          | sed "s/^/H=$1 D=$2 T=$t persistent=$pers pingpong=$pp: /"
        # The same shape in another build's driver, right after (a CMake option's A/B).
        [ -n "${MGD_FWD_BASE_DRIVER:-}" ] && MGD_FWD_PERSISTENT=$pers MGD_FWD_PINGPONG=$pp \
          timeout 60 "$MGD_FWD_BASE_DRIVER" 1 $t $1 $2 1 0 20 | tail -1 \
          | sed "s/^/H=$1 D=$2 T=$t persistent=$pers pingpong=$pp [base]: /"
      done
    done
  done
done 2>&1 | tee "$OUT/fwd_timing.log"
fi

if want sanitizer; then
echo "== compute-sanitizer (ping-pong on) =="
for tool in memcheck racecheck synccheck; do
  for sched in "MGD_FWD_PERSISTENT=0" "MGD_FWD_MAX_CTAS=2"; do
    for args in "1 300 2 128 1 0" "1 200 1 64 0 1" "1 450 2 64 1 0"; do
      echo "-- $tool $sched $args"
      env $sched MGD_FWD_PINGPONG=1 timeout 60 compute-sanitizer --tool $tool --print-limit 10 \
        $DRV $args 2>&1 | tail -3
    done
  done
done 2>&1 | tee "$OUT/fwd_sanitizer.log"
fi

if want pytest; then
echo "== pytest (GPU) =="
MGD_TEST_LOG="$OUT/fwd_pytest_detail.log" timeout ${MGD_FWD_PYTEST_TIMEOUT:-150} $PY -m pytest -q \
  -p no:cacheprovider --maxfail=3 tests/test_cuda_forward.py ${MGD_FWD_EXTRA_TESTS:-} 2>&1 \
  | tee "$OUT/fwd_pytest.log" | tail -15
fi

if want jax; then
echo "== forward through JAX =="
timeout ${MGD_FWD_JAX_TIMEOUT:-150} $PY -m bench.kernel_bars --out "$OUT/jax" --stages forward \
  --lengths ${MGD_FWD_JAX_LENGTHS:-1024 4096 8192 16384 32768} 2>&1 | tee "$OUT/fwd_jax.log"
fi
