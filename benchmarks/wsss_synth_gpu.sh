#!/usr/bin/env bash
# Rows of benchmarks/wsss_synth.py for several sides (configurations or code trees), every
# (side, variant, seed) run in parallel on one GPU, one CPU thread each. A side is
#   NAME                      this tree, the preset as it is
#   NAME=KEY=VALUE[,KEY=VALUE] this tree with config overrides
#   NAME@DIR                  another tree's cosa/ (DIR holds it, e.g. from `git archive SHA cosa`)
# Each side's rows go to OUT/NAME/wsss_synth/ (one JSON per run) and its log to OUT/NAME_V_seedS.log;
# benchmarks/wsss_synth_compare.py puts two sides side by side.
#
#   bash benchmarks/wsss_synth_gpu.sh OUT ITERS "SEEDS" VARIANTS SIDE...
#   bash benchmarks/wsss_synth_gpu.sh OUT 800 "0 1" bf off=loss.reference_warmup=false \
#        on=loss.reference_warmup=true
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 5 ]; then sed -n 2,13p "$0"; exit 2; fi
OUT="$1" ITERS="$2" SEEDS="$3" VARIANTS="$4"
shift 4
WORK=/tmp/cosa_wsss_gpu
mkdir -p "$OUT" "$WORK"
source benchmarks/gpu_setup.sh
[ -f "$WORK/data/classes.json" ] || "$PY" -c "from pathlib import Path; \
from cosa.data import write_synthetic_dataset as w; w(Path('$WORK/data'), 400, 60, 100, seed=0)" || exit 1

pids=()
for spec in "$@"; do
  name="${spec%%[=@]*}" rest="${spec#"${spec%%[=@]*}"}" tree="" sets=()
  case "$rest" in
    @*) tree="$(cd "${rest#@}" && pwd)" || exit 2 ;;
    =*) IFS=, read -ra pairs <<<"${rest#=}"; for p in "${pairs[@]}"; do sets+=(--set "$p"); done ;;
  esac
  mkdir -p "$WORK/$name"
  ln -sfn "$WORK/data" "$WORK/$name/data"
  for seed in $SEEDS; do
    for ((i = 0; i < ${#VARIANTS}; i++)); do
      variant="${VARIANTS:i:1}"
      PYTHONPATH="${tree:+$tree:}${PYTHONPATH:-}" OMP_NUM_THREADS=1 "$PY" benchmarks/wsss_synth.py \
        --device cuda --iters "$ITERS" --variants "$variant" --seed "$seed" --work "$WORK/$name" \
        --out "$OUT/$name" "${sets[@]}" >"$OUT/${name}_${variant}_seed${seed}.log" 2>&1 &
      pids+=($!)
    done
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "runs failed: $failed of ${#pids[@]}"
