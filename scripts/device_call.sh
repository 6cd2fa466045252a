#!/usr/bin/env bash
# Prepare a device call of the committed HEAD: exports HEAD (not the working tree, which
# may hold uncommitted edits) into .device-tree/, which the call carries with .whl and
# .mgd-data (scripts/fetch_device_wheels.sh fills those), and prints the command.
#     bash scripts/device_call.sh [PART ...]     (parts of scripts/gpu_run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .whl ] && [ -d .mgd-data ] || { echo "run scripts/fetch_device_wheels.sh first" >&2; exit 1; }
rm -rf .device-tree && mkdir .device-tree
git archive HEAD | tar -x -C .device-tree
sha=$(git rev-parse HEAD)
# Builds and run folders live outside the carried tree, so a warm machine keeps them
# between calls (the carried tree is replaced on every call).
# XLA's compilation cache from an earlier call (its xla_cache.tgz unpacked into
# .xla-cache/) travels too when there is one.
if [ -d .xla-cache ]; then
  echo "carry: [\".device-tree\", \".whl\", \".mgd-data\", \".xla-cache\"]"
  link=" && ln -s ../.xla-cache .xla-cache"
else
  echo "carry: [\".device-tree\", \".whl\", \".mgd-data\"]"
  link=""
fi
echo "command: cd .device-tree && ln -s ../.whl .whl && ln -s ../.mgd-data .mgd-data$link && MGD_BUILD_DIR=/tmp/mgd-build MGD_RUNS_DIR=/tmp/mgd-runs MGD_DEADLINE_S=\${MGD_DEADLINE_S:-560} MGD_COMMIT=$sha bash scripts/gpu_run.sh $*"
