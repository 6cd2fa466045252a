#!/usr/bin/env bash
# Device-side checks of the CUDA double backward, run on the H200:
#   export CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON HYPOTHESIS_PROFILE=ci
#   source scripts/device_setup.sh && MGD_BUILD_DIR=build/device scripts/cuda_checks.sh
# (without MGD_BUILD_DIR it makes its own CMake build in build/checks, with the
# -Xptxas -v report). Everything it writes goes under $OUT:
#   sass.txt        HGMMA / UTMALDG / LDL-STL counts per kernel (cuobjdump --dump-sass)
#   driver.log      every output written and finite, two runs bitwise identical
#   pytest.log      tests/test_cuda.py on the GPU
#   timing.log      kernel times (CUDA events) and effective TFLOP/s, bf16 causal B=1
#   sanitizer.log   compute-sanitizer memcheck and racecheck on a small shape
#   jax_timing.log  wall-clock through JAX: impl cuda against the reference backends
# Usage: scripts/cuda_checks.sh [quick]   (quick: skip the sanitizers)
# Knobs: MGD_PYTEST_ARGS, MGD_PYTEST_TIMEOUT, MGD_TIMING_LENGTHS ("1024 4096 8192 16384"),
#   MGD_TIMING_LONGEST (e.g. "1 131072 16 128"), MGD_SANITIZER_SHAPES (one "B T H D causal
#   fp16"), MGD_JAX_LENGTHS ("1024 4096"), MGD_TIMING_TIMEOUT (JAX timing, seconds).
set -uo pipefail
OUT=${OUT:-/tmp/mgd_checks}
mkdir -p "$OUT"
# MGD_BUILD_DIR: reuse a build made with -DMGD_BUILD_DRIVER=ON (e.g. the one
# device_setup.sh makes when CMAKE_ARGS carries it); otherwise build here.
BUILD=${MGD_BUILD_DIR:-build/checks}
PY=${PYTHON:-python3}

if [ ! -x $BUILD/kernels/dbwd_driver ]; then
  cmake -S . -B $BUILD -DCMAKE_BUILD_TYPE=Release -DMGD_BUILD_DRIVER=ON \
    -DPython_EXECUTABLE="$(command -v $PY)" > "$OUT/build.log" 2>&1 &&
    cmake --build $BUILD -j 16 >> "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
  echo "== spills (-Xptxas -v) =="
  grep -E "spill|Used [0-9]+ registers|C7512|C7508" "$OUT/build.log" | sort | uniq -c | head -40
fi

echo "== SASS: HGMMA and UTMALDG per kernel, resource usage =="
LIB=$(find $BUILD -name 'libmgd_cuda.so' | head -1)
cuobjdump -res-usage "$LIB" 2>&1 | grep -A1 "sweep" | grep -o "REG:[0-9]* STACK:[0-9]* SHARED:[0-9]* LOCAL:[0-9]*" | sort | uniq -c
cuobjdump --dump-sass "$LIB" > "$OUT/sass_full.txt" 2>&1
awk '/Function :/ {name=$3} /HGMMA/ {h[name]++} /UTMALDG/ {t[name]++} /LDL|STL/ {l[name]++}
     END {for (n in h) printf "%-90s HGMMA %4d UTMALDG %3d LDL/STL %3d\n", n, h[n], t[n], l[n]}' \
  "$OUT/sass_full.txt" | tee "$OUT/sass.txt"
rm -f "$OUT/sass_full.txt"  # tens of MB; the summary above is what we keep

DRV=$BUILD/kernels/dbwd_driver
echo "== determinism and written outputs =="
{
  for args in "1 1 1 64 1 0" "2 65 3 64 0 0" "1 200 2 128 1 0" "1 257 2 128 0 1" "1 1000 3 64 1 1" \
              "2 4096 4 128 1 0"; do
    timeout 15 $DRV $args; rc=$?
    if [ $rc -ne 0 ]; then echo "FAILED (rc $rc): $args"; fi
    if [ $rc -eq 124 ]; then echo "kernel hangs: stopping the checks here"; exit 1; fi
  done
} 2>&1 | tee "$OUT/driver.log"
grep -q "kernel hangs" "$OUT/driver.log" && exit 1

echo "== pytest tests/test_cuda.py (GPU) =="
timeout ${MGD_PYTEST_TIMEOUT:-90} $PY -m pytest tests/test_cuda.py -q --maxfail=3 -p no:cacheprovider ${MGD_PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25

echo "== timing (bf16, causal, B=1) =="
{
  for hd in "12 64" "16 128"; do
    set -- $hd
    for t in ${MGD_TIMING_LENGTHS:-1024 4096 8192 16384}; do
      timeout 30 $DRV 1 $t $1 $2 1 0 10 | tail -1 | sed "s/^/T=$t H=$1 D=$2: /"
    done
  done
  if [ -n "${MGD_TIMING_LONGEST:-}" ]; then  # e.g. "1 131072 16 128": must run, timed twice
    timeout 60 $DRV $MGD_TIMING_LONGEST 1 0 2 | sed "s/^/longest: /"
  fi
} 2>&1 | tee "$OUT/timing.log"

if [ "${1:-}" != "quick" ]; then
  echo "== compute-sanitizer =="
  {
    for tool in memcheck racecheck; do
      for args in ${MGD_SANITIZER_SHAPES:-"1 130 1 128 1 0"}; do
        echo "-- $tool $args"
        timeout 40 compute-sanitizer --tool $tool --print-limit 10 $DRV $args 2>&1 | tail -4
      done
    done
  } 2>&1 | tee "$OUT/sanitizer.log"
fi


echo "== JAX-level timing: impl=cuda double backward vs the references (bf16, causal, B=1) =="
timeout ${MGD_TIMING_TIMEOUT:-60} $PY - <<'PY' 2>&1 | tee "$OUT/jax_timing.log"
import importlib, os, time
import jax, jax.numpy as jnp, numpy as np
from mgd.bindings import cuda

def bench(fn, args, reps=20, warm_s=0.3):
    out = fn(*args); jax.block_until_ready(out)
    t_end = time.perf_counter() + warm_s  # let the clocks ramp up before timing
    while time.perf_counter() < t_end:
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3

for (h, d) in ((12, 64), (16, 128)):
    for t in [int(x) for x in os.environ.get("MGD_JAX_LENGTHS", "1024 4096").split()]:
        rng = np.random.default_rng(0)
        mk = lambda: jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.bfloat16)
        q, k, v, do, ddq, ddk, ddv = (mk() for _ in range(7))
        scale = 1 / np.sqrt(d)
        from mgd.reference import xla
        o, lse = jax.jit(lambda q, k, v: xla.forward(q, k, v, causal=True, scale=scale))(q, k, v)
        args = (q, k, v, o, lse, do, ddq, ddk, ddv)
        flop = 12 * 2 * h * t * t * d / 2
        row = [f"T={t:6d} H={h} D={d}"]
        for name in ("cuda", "triton", "pallas", "xla"):
            try:
                mod = cuda if name == "cuda" else importlib.import_module(f"mgd.reference.{name}")
                if name == "xla" and t > 8192:
                    raise RuntimeError("skipped (memory)")
                f = jax.jit(lambda *a, m=mod: m.double_backward(*a, causal=True, scale=scale))
                ms = bench(f, args)
                row.append(f"{name} {ms:8.3f} ms {flop / ms / 1e9:6.1f} TF/s")
            except Exception as err:  # noqa: BLE001
                row.append(f"{name} n/a ({type(err).__name__}: {str(err)[:60]})")
        print(" | ".join(row), flush=True)
PY

