#!/usr/bin/env bash
# The one GPU script: build (with the CUDA extension), run the GPU tests, tune the
# references, and time every implementation side by side and the pipeline's GPU
# stages, writing everything under $OUT.
#
#     bash scripts/gpu_run.sh [PART ...]        (no PART: all of them, in this order)
#
# PARTs:
#   tune      reference tile tables on this GPU (scripts/tune_references.sh); the tuned
#             tables are used by every later part of the same call
#   tests     GPU tests (tests/ -m gpu; hypothesis profile $HYPOTHESIS_PROFILE, "device";
#             $MGD_TEST_K: a pytest -k expression to run some of them)
#   bench     kernel benchmarks, side by side: double backward, forward/backward,
#             naive XLA, full HVP, then compare mode against the baseline saved first
#             ($MGD_BENCH_SLICES: only the slices named, e.g. xladbwd,xladbwd64;
#             $MGD_XLA_T: naive XLA's lengths; its compilation cache comes back as
#             xla_cache.tgz, and .xla-cache/ carried in seeds it)
#   e2e       one metagradient round per round shape ($MGD_E2E_SHAPES) and attention
#             implementation, the stand-in beside them (bench/test_end_to_end.py); cap
#             $MGD_E2E_CAP_S (540)
#   nvtx      the benchmarks' NVTX ranges seen through Nsight Compute's NVTX filter
#   oracle    the GPT-2-small metagradient round: memory and time (pipeline/bench_oracle.py);
#             L=$MGD_ORACLE_LONG (2048; 0: none) with $MGD_ORACLE_LONG_IMPL (cuda) first,
#             then L=128 for each of $MGD_ORACLE_IMPLS (cuda,pallas,xla,triton; set it
#             empty for the long run alone); cap $MGD_ORACLE_CAP_S (420) seconds
#   planner   the seed-sized round under the memory planner beside fixed plans
#             (pipeline/bench_planner.py): $MGD_PLANNER_PROGRAMS (auto,auto:16GB,frugal:2,
#             frugal:64); cap $MGD_PLANNER_CAP_S (420), $MGD_PLANNER_CHILD_S (240) a program;
#             once per $MGD_PLANNER_LAYER_LOOPS entry (scan; "scan unrolled" for both; the
#             unrolled programs from $MGD_PLANNER_PROGRAMS_UNROLLED when set)
#   demo      `mgd run --preset demo` on the offline corpus in .mgd-data/
#   cuda      our forward and backward kernels: the forward's driver checks (written,
#             finite, sampled rows against float64), compute-sanitizer memcheck, the
#             float64 GPU tests of the three cuda kernels (test_cuda_forward.py,
#             test_cuda_backward.py, test_cuda.py), then the forward and backward through
#             JAX against Pallas, Triton and cuDNN (bench/kernel_bars.py); needs
#             CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON
#   round     one metagradient round per shape, implementation and remat plan, side by
#             side (bench/round_timing.py): $MGD_ROUND_SHAPES (e2e:16384 gpt2s:8192),
#             $MGD_ROUND_IMPLS (pallas,standin,cuda), $MGD_ROUND_PLANS (lean)
#   bars      issue 19's kernel bars through JAX, every implementation and cuDNN side by
#             side (bench/kernel_bars.py): forward and backward at $MGD_BARS_T, the HVP
#             at $MGD_BARS_HVP_T; cap $MGD_BARS_CAP_S (300)
#   drivers   our kernels' CUDA-event timings in the standalone drivers, each schedule
#             and mode a switch selects ($MGD_DRIVER_T; needs -DMGD_BUILD_DRIVER=ON)
#   ncu       Nsight Compute summaries of each kernel (scripts/ncu_kernels.sh)
#   fwd       our forward's device checks (kernels/tools/fwd_checks.sh; $MGD_FWD_ONLY picks
#             sections): every schedule against float64 and bitwise against each other,
#             timings, sanitizers; a failed or hung persistent schedule turns it off
#             (MGD_FWD_PERSISTENT=0) for the parts after it, and says so
#   bwd       our backward's device checks (scripts/cuda_checks_bwd.sh, steps $MGD_BWD_STEPS,
#             default "sass driver": every mode and reduction written, finite, fused against
#             split, timings); bwdsan: its compute-sanitizer step
#   profile   one metagradient round kernel by kernel (experiments/lean_round/profile_round.py)
#             for each of $MGD_PROFILE_IMPLS (cuda pallas standin) at each of
#             $MGD_PROFILE_SHAPES (e2e:16384; seed:128 is the seed labeling round) under remat
#             plan $MGD_PROFILE_PLAN (lean); cap $MGD_PROFILE_CAP_S (120) each
# (docs/gpu-runs.md says what each part needs and returns.)
#
# On the lent H200 (device tool), carrying .whl and .mgd-data (scripts/fetch_device_wheels.sh
# fills both), with the whole call under its ten minutes:
#     MGD_DEADLINE_S=560 MGD_COMMIT=<sha> bash scripts/gpu_run.sh tune tests bench
# (scripts/device_call.sh prints that command for the committed HEAD, run from a clean
# export of it so that uncommitted edits never reach the device.)
# Elsewhere, on any machine with a Hopper GPU and the package's deps:
#     OUT=results/$(date +%F) bash scripts/gpu_run.sh
#
# Time: each part (and each benchmark slice) has its own cap in seconds, multiplied by
# MGD_TIME_SCALE (default 1). With MGD_DEADLINE_S set, no part runs past that many
# seconds after the start: a part is cut to what is left, and skipped (said in the log)
# when less than its minimum is left. A part stopped by its cap keeps what finished.
set -uo pipefail
OUT=${OUT:-/tmp/mgd_gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.log"; }
scale=${MGD_TIME_SCALE:-1}
# A fraction (0.5) is allowed: caps are scaled in awk, not in the shell's integer arithmetic.
awk -v s="$scale" 'BEGIN { exit !(s + 0 > 0) }' || { echo "MGD_TIME_SCALE must be a positive number, got '$scale'"; exit 2; }

# left CAP MIN: seconds this step may take (CAP scaled, cut to the deadline), or 0
# when less than MIN seconds are left before the deadline.
left() {
  local cap min=$2
  cap=$(awk -v c="$1" -v s="$scale" 'BEGIN { printf "%d", c * s }')
  if [ -n "${MGD_DEADLINE_S:-}" ]; then
    local rest=$(( start + MGD_DEADLINE_S - $(date +%s) ))
    [ "$rest" -lt "$min" ] && { echo 0; return; }
    [ "$rest" -lt "$cap" ] && cap=$rest
  fi
  echo "$cap"
}
# capped CAP MIN NAME CMD...: run CMD under the cap, or say why it was skipped.
capped() {
  local cap name=$3
  cap=$(left "$1" "$2"); shift 3
  if [ "$cap" -le 0 ]; then stamp "$name: skipped (deadline)"; return 0; fi
  stamp "$name (cap ${cap}s)"
  timeout -s INT -k 10 "$cap" "$@"
  local rc=$?
  stamp "$name: exit $rc$([ $rc = 124 ] && echo ' (cap reached)')"
}

export MGD_COMMIT=${MGD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $MGD_COMMIT"
  echo "command: MGD_DEADLINE_S=${MGD_DEADLINE_S:-} MGD_TIME_SCALE=$scale bash scripts/gpu_run.sh $*"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
    --format=csv
} > "$OUT/env.txt" 2>&1

stamp "setup (install in place, CUDA build)"
source scripts/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__)" >> "$OUT/env.txt" 2>&1
python3 -c "from mgd.bindings import cuda; lib, why = cuda._load(); print('cuda extension:', 'loaded' if lib else why)" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- parts ---------------------------------------------------------------------------
part_tune() {
  mkdir -p "$OUT/tune"
  capped 220 60 "tune references" env OUT="$OUT/tune" bash scripts/tune_references.sh \
    > "$OUT/tune.log" 2>&1
  stamp "tune: $(tail -n 1 "$OUT/tune.log")"
}

part_tests() {
  # Each outcome (and a failure's traceback) lands in gpu_tests_progress.log as the
  # test ends: a cap that stops pytest before its summary loses nothing. The whole
  # GPU suite took 354 s on the H200 (2026-11-29), so it wants a call of its own;
  # $MGD_TEST_K (a pytest -k expression) reruns some of it.
  MGD_TEST_LOG="$OUT/gpu_tests_progress.log" HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-device} \
    capped 480 40 "GPU tests" python3 -m pytest tests/test_cuda.py tests/test_pallas.py tests/test_triton.py tests/test_xla.py \
    tests/test_api.py -m gpu ${MGD_TEST_K:+-k "$MGD_TEST_K"} -q -rfEs -p no:cacheprovider --durations=15 \
    > "$OUT/gpu_tests.log" 2>&1
  stamp "GPU tests: $(tail -n 1 "$OUT/gpu_tests.log")"
}

bench_slice() {  # name seconds impls lengths heads dim -k-expression [extra pytest args]
  local name=$1 seconds=$2 impls=$3 lengths=$4 heads=$5 dim=$6 expr=$7; shift 7
  # MGD_BENCH_SLICES (comma-separated names) reruns some slices, e.g. those a deadline cut.
  if [ -n "${MGD_BENCH_SLICES:-}" ] && [[ ",$MGD_BENCH_SLICES," != *",$name,"* ]]; then return 0; fi
  # Naive XLA spent far longer per shape on the H200 than its timed calls explain
  # (T=8192 double backward: over a minute, for ~0.1 s calls; 2026-11-29), most
  # likely compiling (GEMM autotuning; bench_progress.log now records compile_s).
  # Its executables go to a persistent cache that outlives the call on a warm
  # machine and comes back as xla_cache.tgz (unpacked into .xla-cache/, which the
  # next call carries), so a rerun of the part spends its time measuring. Measured
  # 2026-11-29: 18 to 27 s of compiling per double backward shape.
  local cache=()
  [ "$impls" = xla ] && cache=(JAX_COMPILATION_CACHE_DIR="$xla_cache")
  capped "$seconds" 15 "bench $name" \
    env ${cache[@]+"${cache[@]}"} MGD_BENCH_PROGRESS="$OUT/bench_progress.log" MGD_BENCH_IMPLS=$impls MGD_BENCH_T=$lengths MGD_BENCH_H=$heads MGD_BENCH_D=$dim python3 -m pytest bench -m "gpu and not e2e" -k "$expr" \
    -p no:cacheprovider -q -rs --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$OUT/json/$name.json" "$@" >> "$OUT/bench.log" 2>&1
  stamp "bench $name: $(tail -n 1 "$OUT/bench.log")"
}

part_bench() {
  # One slice per head configuration so the grid is (12, 64) and (16, 128), not their
  # cross product. Every result also lands in bench.jsonl the moment it is measured.
  export MGD_BENCH_JSONL="$OUT/bench.jsonl" MGD_BENCH_B=1 MGD_BENCH_CAUSAL=1 MGD_BENCH_DTYPE=bfloat16
  export MGD_BENCH_MAX_S=${MGD_BENCH_MAX_S:-0.25} MGD_BENCH_SETS=${MGD_BENCH_SETS:-2}
  mkdir -p "$OUT/json"
  local lengths=1024,4096,8192,16384,32768
  xla_cache=${MGD_XLA_CACHE:-/tmp/mgd-xla-cache}
  mkdir -p "$xla_cache"
  [ -d .xla-cache ] && cp -rn .xla-cache/. "$xla_cache/" && stamp "XLA cache: $(ls "$xla_cache" | wc -l) entries carried in"
  # The double backward first (the point of the project), then the references'
  # forward and backward, then naive autodiff (double backward first, up to its
  # out-of-memory point: a longer T is then recorded without an attempt), then the
  # full HVP through mgd.attention. The caps add up to about 505 s, so the part fits
  # one ten-minute call by itself (measured on the H200, 2026-11-29: the fused slices
  # took 36 to 51 s; naive XLA, compiling, needs the most, so the slices want its
  # cache from an earlier call).
  bench_slice dbwd128 60 pallas,triton,cuda $lengths 16 128 "double_backward" \
    --benchmark-storage="file://$OUT/storage" --benchmark-save=baseline
  bench_slice dbwd64 45 pallas,triton,cuda $lengths 12 64 "double_backward"
  bench_slice fb128 45 pallas,triton $lengths 16 128 "not hvp and not double_backward"
  bench_slice fb64 40 pallas,triton $lengths 12 64 "not hvp and not double_backward"
  # Naive XLA at every length: where it runs out of memory, that is its result.
  local xla_t=${MGD_XLA_T:-$lengths}
  bench_slice xladbwd 100 xla $xla_t 16 128 "double_backward"
  bench_slice xladbwd64 55 xla $xla_t 12 64 "double_backward"
  bench_slice xlafb 60 xla $xla_t 16 128 "not hvp and not double_backward"
  bench_slice xlafb64 40 xla $xla_t 12 64 "not hvp and not double_backward"
  bench_slice hvp 35 pallas,triton,cuda 8192 16 128 "hvp"
  # Compare mode against the baseline saved above: the regression gate users run.
  # (Only when this call saved one: a rerun of other slices has none to compare with.)
  if ! ls "$OUT"/storage/*/0001_*.json > /dev/null 2>&1; then
    stamp "bench compare: skipped (no baseline saved in this call; it needs dbwd128)"
  else
    bench_slice compare 25 pallas,triton,cuda 4096 16 128 "double_backward" \
      --benchmark-storage="file://$OUT/storage" --benchmark-compare=0001 \
      --benchmark-compare-fail=median:25%
  fi
  rm -rf "$OUT/storage"
  [ -n "$(ls "$xla_cache")" ] && tar -C "$xla_cache" -czf "$OUT/xla_cache.tgz" . \
    && stamp "XLA cache: $(ls "$xla_cache" | wc -l) entries, $(du -sh "$OUT/xla_cache.tgz" | cut -f1) returned"
}

part_e2e() {
  mkdir -p "$OUT/json"
  # Each (shape, implementation) compiles a second-order round (15-30 s on an H100) and
  # runs a few rounds of up to seconds: the default four shapes want a call of their own.
  capped ${MGD_E2E_CAP_S:-540} 30 "e2e bench" \
    env MGD_BENCH_JSONL="$OUT/e2e.jsonl" MGD_BENCH_MAX_S=${MGD_BENCH_MAX_S:-0.25} python3 -m pytest bench/test_end_to_end.py -m "gpu and e2e" \
    -p no:cacheprovider -q -rs --benchmark-json "$OUT/json/e2e.json" > "$OUT/e2e.log" 2>&1
  stamp "e2e: $(tail -n 1 "$OUT/e2e.log")"
}

part_nvtx() {
  # The kernels inside the benches' "mgd@forward" range, then inside a range that does
  # not exist: the first must list kernels, the second none.
  if ! command -v ncu > /dev/null; then stamp "nvtx: skipped (no ncu)"; return; fi
  local sel=(python3 -m pytest bench -m gpu -k "test_forward and pallas and t1024" \
             --benchmark-disable -p no:cacheprovider -q)
  for range in "mgd@forward" "mgd@no_such_range"; do
    capped 45 20 "ncu --nvtx-include $range" \
      env MGD_BENCH_IMPLS=pallas MGD_BENCH_T=1024 MGD_BENCH_H=16 MGD_BENCH_D=128 ncu --clock-control none --nvtx \
      --nvtx-include "$range" --metrics gpu__time_duration.sum --csv "${sel[@]}" \
      > "$OUT/nvtx_${range#mgd@}.csv" 2>&1
    stamp "nvtx $range: $(grep -c gpu__time_duration "$OUT/nvtx_${range#mgd@}.csv") kernel results"
  done
}

part_oracle() {
  # The long round runs once (its first round is its time, compile excluded): a
  # second one would not fit a ten-minute call.
  local cap=${MGD_ORACLE_CAP_S:-420}
  capped "$cap" 90 "oracle round" python3 -m mgd.pipeline.bench_oracle --out "$OUT/oracle.json" \
    --impls "${MGD_ORACLE_IMPLS-cuda,pallas,xla,triton}" --long "${MGD_ORACLE_LONG:-2048}" \
    --long-impl "${MGD_ORACLE_LONG_IMPL:-cuda}" --long-first --repeats 1 \
    --repeats-long "${MGD_ORACLE_REPEATS_LONG:-0}" --child-timeout "$cap" > "$OUT/oracle.log" 2>&1
}

part_planner() {
  local loop suffix programs
  for loop in ${MGD_PLANNER_LAYER_LOOPS:-scan}; do
    suffix=${loop/scan/}
    programs=MGD_PLANNER_PROGRAMS${suffix:+_${suffix^^}}   # MGD_PLANNER_PROGRAMS_UNROLLED
    capped ${MGD_PLANNER_CAP_S:-420} 90 "planner round ($loop layers)" env \
      JAX_COMPILATION_CACHE_DIR=/tmp/mgd-jax-cache python3 -m mgd.pipeline.bench_planner \
      --out "$OUT/planner${suffix:+_$suffix}.json" --layer-loop "$loop" \
      --programs "${!programs:-${MGD_PLANNER_PROGRAMS:-auto,auto:16GB,frugal:2,frugal:64}}" --repeats 2 \
      --child-timeout "${MGD_PLANNER_CHILD_S:-240}" > "$OUT/planner${suffix:+_$suffix}.log" 2>&1
    grep "bench_planner.*round_s=" "$OUT/planner${suffix:+_$suffix}.log" | tail -n 8
  done
}

part_demo() {
  # Its own time is the bar (issue #7: at most 8 minutes on one H200); the report's
  # stage timings say where it went.
  local run_dir=${MGD_RUNS_DIR:-runs}/demo
  capped 540 120 "demo preset" env MGD_DATA_DIR=.mgd-data python3 -m mgd.cli run --preset demo \
    --out "$run_dir" --no-progress > "$OUT/demo.log" 2>&1
  [ -d "$run_dir" ] && tar -C "$run_dir" -czf "$OUT/demo_run.tgz" --exclude='_ckpt' --exclude='*.npz' .
  # The labels and the distilled scores (about 2 MB) come back too, for offline analysis
  # (label reliability, scorer fits) without another device call.
  (cd "$run_dir" 2>/dev/null \
    && python3 -c "import numpy as np; np.save('cluster.npy', np.load('corpus/arrays.npz')['cluster'])" \
    && tar -czf "$OUT/demo_labels.tgz" $(ls oracle/labels.npz scorer/scores.npz cluster.npy 2>/dev/null)) || true
}

part_cuda() {
  local drv=${MGD_BUILD_DIR:-build/device}/kernels/fwd_driver args
  if [ -x "$drv" ]; then
    stamp "forward driver checks"
    for args in "1 1 1 64 1 0" "2 65 3 64 0 0" "1 200 2 128 1 0" "1 257 2 128 0 1" \
                "1 1000 3 64 1 1" "2 4096 4 128 1 0" "1 4097 2 128 0 1"; do
      timeout 20 "$drv" $args || echo "FAILED (exit $?): $args"
    done > "$OUT/fwd_driver.log" 2>&1
    capped 60 20 "forward memcheck" compute-sanitizer --tool memcheck --print-limit 10 "$drv" 1 300 2 128 1 0 \
      > "$OUT/fwd_sanitizer.log" 2>&1
    stamp "forward driver: $(grep -c FAILED "$OUT/fwd_driver.log") failed; memcheck: $(tail -n 1 "$OUT/fwd_sanitizer.log")"
  else
    stamp "no $drv: build with CMAKE_ARGS=-DMGD_BUILD_DRIVER=ON for the driver checks"
  fi
  MGD_TEST_LOG="$OUT/cuda_tests_progress.log" capped 150 40 "cuda kernel tests" python3 -m pytest \
    tests/test_cuda_forward.py tests/test_cuda_backward.py tests/test_cuda.py -m gpu -q -rfEs \
    -p no:cacheprovider --maxfail=5 > "$OUT/cuda_tests.log" 2>&1
  stamp "cuda kernel tests: $(tail -n 1 "$OUT/cuda_tests.log")"
  capped 140 40 "forward and backward through JAX" python3 -m bench.kernel_bars --out "$OUT/jax" \
    --stages forward backward --lengths ${MGD_CUDA_T:-4096 8192 16384} > "$OUT/jax.log" 2>&1
  grep -A40 "^## forward" "$OUT/jax/bars.md" 2>/dev/null | head -n 40
}

part_round() {
  local shapes=()
  for s in ${MGD_ROUND_SHAPES:-e2e:16384 gpt2s:8192}; do shapes+=(--shape "$s"); done
  capped 400 60 "metagradient rounds" python3 -m bench.round_timing "${shapes[@]}" \
    --impls "${MGD_ROUND_IMPLS:-pallas,standin,cuda}" --plans "${MGD_ROUND_PLANS:-lean}" \
    --repeats "${MGD_ROUND_REPEATS:-3}" --out "$OUT/round" > "$OUT/round.log" 2>&1
  [ -f "$OUT/round/round_timing.md" ] && cat "$OUT/round/round_timing.md"
}

part_bars() {
  local cap=${MGD_BARS_CAP_S:-300}
  capped "$cap" 60 "kernel bars" python3 -m bench.kernel_bars --out "$OUT/bars" \
    --stages forward backward --lengths ${MGD_BARS_T:-1024 4096 8192 16384 32768} \
    --budget-s $(( $(left "$cap" 60) * 2 / 3 )) > "$OUT/bars.log" 2>&1
  capped "$cap" 30 "HVP bars" python3 -m bench.kernel_bars --out "$OUT/bars" --stages hvp \
    --lengths ${MGD_BARS_HVP_T:-8192 16384} --budget-s $(( $(left "$cap" 30) - 20 )) >> "$OUT/bars.log" 2>&1
  grep -A40 "^## Bars" "$OUT/bars.log" | tail -n 40
}

part_drivers() {
  local dir=${MGD_BUILD_DIR:-build/device}/kernels t hd pp mode
  [ -x "$dir/fwd_driver" ] || { stamp "drivers: skipped (build with -DMGD_BUILD_DRIVER=ON)"; return; }
  {
    for hd in "16 128" "12 64"; do
      set -- $hd
      for t in ${MGD_DRIVER_T:-8192 16384}; do
        for pp in 0 1; do
          echo "forward H=$1 D=$2 T=$t pingpong=$pp: $(MGD_FWD_PINGPONG=$pp timeout 60 \
            "$dir/fwd_driver" 1 "$t" "$1" "$2" 1 0 20 | tail -n 1)"
        done
        for mode in 0 1; do
          echo "backward H=$1 D=$2 T=$t fused=$mode: $(timeout 60 \
            "$dir/bwd_driver" 1 "$t" "$1" "$2" 1 0 20 0 "$mode" | tail -n 1)"
        done
        echo "double backward H=$1 D=$2 T=$t: $(timeout 60 \
          "$dir/dbwd_driver" 1 "$t" "$1" "$2" 1 0 20 | tail -n 1)"
      done
    done
  } > "$OUT/drivers.log" 2>&1
  stamp "drivers: $(wc -l < "$OUT/drivers.log") timings"
  cat "$OUT/drivers.log"
}

part_ncu() {
  capped 150 40 "ncu summaries" env OUT="$OUT" bash scripts/ncu_kernels.sh > "$OUT/ncu.log" 2>&1
  cat "$OUT/ncu.log"
}

part_fwd() {
  capped ${MGD_FWD_CAP_S:-240} 40 "forward checks" env OUT="$OUT/fwd" MGD_BUILD_DIR="${MGD_BUILD_DIR:-build/device}" \
    bash kernels/tools/fwd_checks.sh > "$OUT/fwd_checks.log" 2>&1
  local failed=0
  # Without the driver section (MGD_FWD_ONLY) there is nothing to judge the schedule by.
  if [ -f "$OUT/fwd/fwd_driver.log" ]; then
    failed=$(grep -c "FAILED\|kernel hangs" "$OUT/fwd/fwd_driver.log")
    stamp "forward checks: $failed failed lines"
  fi
  if [ "$failed" != 0 ]; then
    export MGD_FWD_PERSISTENT=0
    stamp "forward: persistent schedule turned off for the later parts (MGD_FWD_PERSISTENT=0)"
  fi
  grep -h "TFLOP" "$OUT/fwd/fwd_timing.log" 2>/dev/null | head -n 24
  tail -n 12 "$OUT/fwd/fwd_sanitizer.log" 2>/dev/null
}

part_bwd() {
  capped ${MGD_BWD_CAP_S:-120} 30 "backward checks" env OUT="$OUT/bwd" MGD_BUILD_DIR="${MGD_BUILD_DIR:-build/device}" \
    MGD_BWD_STEPS="${MGD_BWD_STEPS:-sass driver}" MGD_TIMING_LENGTHS="${MGD_BWD_T:-8192 16384}" \
    bash scripts/cuda_checks_bwd.sh > "$OUT/bwd_checks.log" 2>&1
  stamp "backward checks: $(grep -c FAILED "$OUT/bwd/bwd_driver.log" 2>/dev/null) failed lines"
  grep -h "TFLOP\|agree\|FAILED\|hangs" "$OUT/bwd/bwd_driver.log" 2>/dev/null | tail -n 24
}

part_bwdsan() {
  capped ${MGD_BWDSAN_CAP_S:-150} 30 "backward sanitizers" env OUT="$OUT/bwd" MGD_BUILD_DIR="${MGD_BUILD_DIR:-build/device}" \
    MGD_BWD_STEPS=sanitizer bash scripts/cuda_checks_bwd.sh > "$OUT/bwd_sanitizer_stdout.log" 2>&1
  grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|^--" "$OUT/bwd/bwd_sanitizer.log" 2>/dev/null | paste - - |
    tail -n 30
}

part_profile() {
  local impl shape dir
  for shape in ${MGD_PROFILE_SHAPES:-e2e:16384}; do
    for impl in ${MGD_PROFILE_IMPLS:-cuda pallas standin}; do
      dir="$OUT/profile_${shape/:/_}_$impl"
      capped ${MGD_PROFILE_CAP_S:-120} 45 "round profile $shape $impl" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        python3 experiments/lean_round/profile_round.py --shape "$shape" --impl "$impl" \
        --plan "${MGD_PROFILE_PLAN:-lean}" --rounds 2 --hlo --out "$dir" > "$dir.log" 2>&1
      grep -A14 -i "by category" "$dir/profile.md" 2>/dev/null | head -n 16
      grep -A18 "By source" "$dir/profile.md" 2>/dev/null | head -n 20
      grep -A8 "by kernel kind" "$dir/profile.md" 2>/dev/null | head -n 10
    done
  done
}

parts=${*:-tune tests bench e2e nvtx oracle demo}
for part in $parts; do
  case $part in
    tune|tests|bench|e2e|nvtx|oracle|planner|demo|cuda|round|bars|drivers|ncu|profile|fwd|bwd|bwdsan) "part_$part" ;;
    *) echo "unknown part: $part (tune tests bench e2e nvtx oracle planner demo cuda round bars drivers ncu profile fwd bwd bwdsan)"; exit 2 ;;
  esac
done

stamp "done"
# Few files come back from the device: all but the summary (and XLA's cache, up to
# 16 MiB a file) travel as one archive.
cp "$OUT/summary.log" /tmp/mgd_summary.log
if [ -f "$OUT/xla_cache.tgz" ]; then mv "$OUT/xla_cache.tgz" /tmp/mgd_xla_cache.tgz; fi
tar -C "$OUT" -czf /tmp/mgd_results.tgz . && rm -rf "${OUT:?}"/* \
  && mv /tmp/mgd_results.tgz "$OUT/results.tgz" && mv /tmp/mgd_summary.log "$OUT/summary.log"
if [ -f /tmp/mgd_xla_cache.tgz ]; then mv /tmp/mgd_xla_cache.tgz "$OUT/xla_cache.tgz"; fi
