# Source this first on the lent GPU machine (no network there):
#   source scripts/device_setup.sh
# It installs the wheels carried in .whl/ (see scripts/fetch_device_wheels.sh) into
# /tmp/site and installs this package in place, building the CUDA extension there.
set -o pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The image's python3 already has jax, scikit-build-core, cmake and ninja.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  -Cbuild-dir="${MGD_BUILD_DIR:-build/device}" 2>&1 | tail -n 20 || return 1
export MGD_DEVICE_SETUP_DONE=1
python3 - <<'PY'
import jax, mgd
print("jax", jax.__version__, jax.devices())
PY
