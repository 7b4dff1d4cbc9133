#!/usr/bin/env bash
# The GPU-marked tests on a CUDA machine (CI runs on CPU and deselects them), then every kernel
# test (tests/kernels: on CPU they run in Triton's interpreter, here compiled on the GPU):
#   bash benchmarks/gpu_tests.sh [pytest paths or options...]    (default: every test file)
# Prints pytest's short summary (pyproject's addopts already adds -q: a second -q would hide the
# counts); with $OUT set also writes $OUT/pytest_gpu.txt (the full log).
# GPU_TESTS_TIMEOUT (seconds, default 1800) stops a run that hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh
log=${OUT:-/tmp}/pytest_gpu.txt
timeout "${GPU_TESTS_TIMEOUT:-1800}" python3 -m pytest -m gpu -rfEs -p no:cacheprovider "${@:-tests}" >"$log" 2>&1
rc=$?
if [ $# -eq 0 ]; then
  timeout "${GPU_TESTS_TIMEOUT:-1800}" python3 -m pytest -rfEs -p no:cacheprovider tests/kernels >>"$log" 2>&1
  rc2=$?
  [ $rc -ne 0 ] || rc=$rc2
fi
grep -E "^(FAILED|ERROR)|passed|failed|error" "$log" | tail -40
[ $rc -eq 0 ] || { echo "--- pytest exit $rc; last lines of $log:"; tail -5 "$log"; }
exit $rc
