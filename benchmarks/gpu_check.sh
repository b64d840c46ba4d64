#!/usr/bin/env bash
# The CUDA half of the product in one call, on a machine with one GPU and no network:
#   1. the GPU tests (`pytest -m gpu`; TensorRT tests skip where TensorRT is not installed),
#   2. training speed of the demo and paper configurations (benchmarks/train_speed.py),
#   3. a 200-iteration demo training on CUDA with its test mIoU (the same on the CPU for comparison:
#      cosa train --preset demo --max-iters 200 --device cpu --out RUN --json),
#   4. host-device synchronisations per step of the paper configuration (benchmarks/cuda_syncs.py).
# Results go to OUT (default benchmarks/results/gpu); each part has its own time limit so one hang
# does not cost the others, and a failed part does not stop the rest (the summary says which failed).
#
#   bash benchmarks/gpu_check.sh [OUT]
# Packages the machine lacks can be carried as wheels in .whl/ (installed with --no-deps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
mkdir -p "$OUT"
source benchmarks/gpu_setup.sh
status=()

part() {  # part NAME SECONDS COMMAND...: run with a limit, record its exit status
  local name="$1" limit="$2"
  shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  status+=("$name=$rc/$((SECONDS - start))s")
}

# Modules that import tritonclient at the top hold no GPU tests.
part gpu_tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs \
  --ignore=tests/test_triton_client.py --ignore=tests/test_triton_repo.py \
  --ignore=tests/test_triton_server.py tests
part train_speed 120 "$PY" benchmarks/train_speed.py --configs demo,paper --device cuda --out "$OUT"
part demo200 150 bash -c "'$PY' -m cosa.app.cli train --preset demo --max-iters 200 --device cuda \
  --out /tmp/cosa_demo200 --json > '$OUT/demo200_cuda.json'"
part cuda_syncs 90 "$PY" benchmarks/cuda_syncs.py --out "$OUT"
echo "=== summary: ${status[*]}"
