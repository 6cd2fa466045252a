#!/usr/bin/env bash
# The one GPU script: build (with the CUDA extension), run the GPU tests, and time
# every implementation side by side, writing everything under $OUT.
#
# On the lent H200 (device tool), from the repository root, carrying .whl
# (scripts/fetch_device_wheels.sh fills it):
#     bash scripts/gpu_run.sh
# Elsewhere, on any machine with an NVIDIA Hopper GPU and the package's deps:
#     OUT=results/$(date +%F) bash scripts/gpu_run.sh
#
# Time caps (seconds) keep it inside one ten-minute call: MGD_TEST_S for the GPU
# tests, and each benchmark slice's own cap below, all multiplied by MGD_TIME_SCALE
# (default 1; raise it where time is not short). A slice stopped by its cap still
# writes what finished.
set -uo pipefail
OUT=${OUT:-/tmp/mgd_gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

export MGD_COMMIT=${MGD_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $MGD_COMMIT"
  echo "command: bash scripts/gpu_run.sh"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
} > "$OUT/env.txt" 2>&1

stamp "setup (install in place, CUDA build)"
source scripts/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__)" >> "$OUT/env.txt" 2>&1
python3 -c "from mgd.bindings import cuda; lib, why = cuda._load(); print('cuda extension:', 'loaded' if lib else why)" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "GPU tests"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-quick} timeout -s INT "$(( ${MGD_TEST_S:-75} * ${MGD_TIME_SCALE:-1} ))" \
  python3 -m pytest tests/test_cuda.py tests/test_pallas.py tests/test_triton.py tests/test_xla.py -m gpu -q -rfEs -p no:cacheprovider --durations=10 \
  > "$OUT/gpu_tests.log" 2>&1
stamp "GPU tests: $(tail -n 1 "$OUT/gpu_tests.log")"

# One slice per head configuration so the grid is (12, 64) and (16, 128), not their
# cross product. Every result also lands in bench.jsonl the moment it is measured.
export MGD_BENCH_JSONL="$OUT/bench.jsonl" MGD_BENCH_B=1 MGD_BENCH_CAUSAL=1 MGD_BENCH_DTYPE=bfloat16
export MGD_BENCH_MAX_S=${MGD_BENCH_MAX_S:-0.25} MGD_BENCH_SETS=${MGD_BENCH_SETS:-2}
mkdir -p "$OUT/json"
bench_slice() {  # name seconds impls lengths heads dim -k-expression [extra pytest args]
  local name=$1 seconds=$2 impls=$3 lengths=$4 heads=$5 dim=$6 expr=$7; shift 7
  stamp "bench $name"
  MGD_BENCH_IMPLS=$impls MGD_BENCH_T=$lengths MGD_BENCH_H=$heads MGD_BENCH_D=$dim \
    timeout -s INT "$(( seconds * ${MGD_TIME_SCALE:-1} ))" python3 -m pytest bench -m "gpu and not e2e" -k "$expr" \
    -p no:cacheprovider -q -rs --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$OUT/json/$name.json" "$@" >> "$OUT/bench.log" 2>&1
  stamp "bench $name: $(tail -n 1 "$OUT/bench.log")"
}
# The double backward first (the point of the project), then the forward and
# backward of the references, then naive autodiff (up to its out-of-memory point),
# then the full Hessian-vector product through mgd.attention. The CUDA path's
# forward and backward are the references' own (bindings/cuda.py), so only its
# double backward and HVP are timed.
lengths=1024,4096,8192,16384,32768
bench_slice dbwd128 90 pallas,triton,cuda $lengths 16 128 "double_backward" \
  --benchmark-storage="file://$OUT/storage" --benchmark-save=baseline
bench_slice dbwd64 80 pallas,triton,cuda $lengths 12 64 "double_backward"
bench_slice fb128 70 pallas,triton $lengths 16 128 "not hvp and not double_backward"
bench_slice fb64 60 pallas,triton $lengths 12 64 "not hvp and not double_backward"
bench_slice xla128 50 xla 1024,4096,8192,16384 16 128 "not hvp and (t16384 and double_backward or not t16384)"
bench_slice xla64 25 xla 1024,4096,8192 12 64 "not hvp"
bench_slice hvp 40 pallas,triton,cuda 8192 16 128 "hvp"
# Compare mode against the baseline saved above: the regression gate users run.
bench_slice compare 25 pallas,triton,cuda 4096 16 128 "double_backward" \
  --benchmark-storage="file://$OUT/storage" --benchmark-compare=0001 \
  --benchmark-compare-fail=median:25%
rm -rf "$OUT/storage"
# At most eight files come back from the device: the JSON runs travel as one archive.
tar -C "$OUT" -czf "$OUT/bench_json.tgz" json && rm -rf "$OUT/json"
stamp "done"
