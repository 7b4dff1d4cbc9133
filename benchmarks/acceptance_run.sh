#!/usr/bin/env bash
# The acceptance run of issue #17 on one GPU machine, in device calls of under ten minutes each, in
# one lease: the official AiM code first (its rows become the harness's reference, so every ratio
# is measured on the same machine), then aimkit's whole harness, then the GPU tests in three groups.
# On 2026-12-03 official + harness + tests core took 1,290 s of device time with the machine's
# start: the recipes and training groups need a second session's 30 minutes.
#
#   bash benchmarks/acceptance_run.sh official OFFICIAL_CODE_DIR TOOLS_DIR
#        official sampling (AiM-B/L/XL at 256, AiM-XL at 16) and training (AiM-B, AiM-L at 64 x 256)
#        -> $OUT/official.json (about 8 minutes: the official step's first steps autotune for ~100 s)
#   bash benchmarks/acceptance_run.sh harness OFFICIAL_JSON
#        benchmarks/run_all.py's default grid with that reference, less the Mamba2-vs-transformer
#        comparison (issue #19's, measured on its own), then the kernel profile of AiM-L's captured
#        training step (where the MFU goes) -> $OUT/bench.*, $OUT/profile_train_aim-l.json
#   bash benchmarks/acceptance_run.sh tests [core|recipes|training]
#        the GPU-marked tests, in three groups that each fit one call (2026-12-03 on one H200: all of
#        them took more than ten minutes; the recipes ~4 minutes, the training steps ~5): core
#        (everything but the two below), recipes (tests/test_train*.py), training (tests/training);
#        no group: core. After core: AiM-B's step with several processes' step kind (layer graphs)
#        at grad_accum 1 and 4 (-> $OUT/train_throughput.json), then the kernel tests with the time left
#   bash benchmarks/acceptance_run.sh kernels
#        the kernel tests (tests/kernels), compiled on the GPU (on a CPU they run in Triton's interpreter)
#
# OFFICIAL_CODE_DIR is a copy of ../shared/reference/official_aim and TOOLS_DIR one of
# ../shared/tools (../shared does not travel to the device: copy both into an ignored folder of
# the checkout and carry it, with .whl and .whl-cc). Each part prints its rows as it goes.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in official|harness|tests|kernels) ;; *) sed -n '2,/^set /p' "$0" | grep '^#'; exit 2 ;; esac
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/acceptance}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo "t=$(( $(date +%s) - T0 ))s"; }
left() { echo $(( 585 - ($(date +%s) - T0) )); }  # seconds left of this call's ten minutes

case "${1:-}" in
  official)
    code=${2:?official code dir}; tools=${3:?tools dir}
    timeout -k 10 250 python3 "$tools/bench_official.py" "$code" "$OUT/official_sampling.json" \
      AiM-B:256 AiM-XL:16 AiM-XL:256 AiM-L:256 > "$OUT/official_sampling.log" 2>&1
    echo "official sampling rc=$? $(elapsed)"; grep "^{" "$OUT/official_sampling.log"
    timeout -k 10 "$(left)" python3 "$tools/bench_official_train.py" "$code" \
      "$OUT/official_train.json" AiM-B:64 AiM-L:64 > "$OUT/official_train.log" 2>&1
    echo "official training rc=$? $(elapsed)"; grep "^{" "$OUT/official_train.log"
    python3 benchmarks/official_reference.py "$OUT/official_sampling.json" "$OUT/official_train.json" "$OUT/official.json"
    ;;
  harness)
    reference=${2:?official.json from the official part}
    PYTHONUNBUFFERED=1 timeout -k 10 430 python3 benchmarks/run_all.py --reference "$reference" --budget-s 330 \
      --compare-models "" > "$OUT/run_all.log" 2>&1
    echo "run_all rc=$? $(elapsed)"; tail -60 "$OUT/run_all.log"
    [ "$(left)" -gt 30 ] || { echo "no time left for the AiM-L training profile"; exit 0; }
    timeout -k 10 "$(left)" python3 benchmarks/profile_train.py --model aim-l --variants "" \
      --steps 5 > "$OUT/profile_train.log" 2>&1
    echo "AiM-L training profile rc=$? $(elapsed)"; tail -25 "$OUT/profile_train.log"
    ;;
  tests)
    group=${2:-core}
    case "$group" in
      core) GPU_TESTS_TIMEOUT=300 bash benchmarks/gpu_tests.sh tests --ignore=tests/training \
              --deselect tests/test_train.py --deselect tests/test_train_compile.py ;;
      recipes) GPU_TESTS_TIMEOUT=570 bash benchmarks/gpu_tests.sh tests/test_train.py tests/test_train_compile.py ;;
      training) GPU_TESTS_TIMEOUT=570 bash benchmarks/gpu_tests.sh tests/training ;;
      *) echo "unknown test group $group: core, recipes or training"; exit 2 ;;
    esac
    echo "gpu tests ($group) rc=$? $(elapsed)"
    [ "$group" = core ] || exit 0
    timeout -k 10 150 python3 benchmarks/train_throughput.py --models aim-b --batch 64 --steps 10 --warmup 3 \
      --grad-accum 1,4 --policy train_step=layer_graphs > "$OUT/train_accum.log" 2>&1
    echo "grad_accum 1 and 4, layer graphs rc=$? $(elapsed)"; grep "params" "$OUT/train_accum.log"
    ;&
  kernels)
    [ "$(left)" -gt 30 ] || { echo "no time left for the kernel tests"; exit 0; }
    timeout -k 10 "$(left)" python3 -m pytest -rfEs -p no:cacheprovider tests/kernels > "$OUT/pytest_kernels.txt" 2>&1
    echo "kernel tests rc=$? $(elapsed)"; grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/pytest_kernels.txt" | tail -20
    ;;
esac
