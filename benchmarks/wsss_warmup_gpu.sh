#!/usr/bin/env bash
# What the reference's warm-up (`loss.reference_warmup=true`: thresholds from real CAMs, decoder
# weight decay during the warm-up) does to the demo preset, on the synthetic benchmark: variants b
# (reference configuration) and f (all three techniques) of benchmarks/wsss_synth.py, 800
# iterations, seeds 0 and 1, with the switch off (the demo preset as shipped) and on. The eight runs
# share one GPU, in parallel, one CPU thread each; each side's rows go to OUT/off and OUT/on, and
# benchmarks/wsss_synth_compare.py --before OUT/off --after OUT/on tabulates the change.
#
#   bash benchmarks/wsss_warmup_gpu.sh [OUT] [ITERS] [SEEDS]     # SEEDS like "0 1" (the default)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/wsss_warmup_gpu}"
ITERS="${2:-800}"
SEEDS="${3:-0 1}"
WORK=/tmp/cosa_wsss_warmup
mkdir -p "$OUT" "$WORK/off" "$WORK/on"
source benchmarks/gpu_setup.sh
[ -f "$WORK/off/data/classes.json" ] || "$PY" -c "from pathlib import Path; from cosa.data import write_synthetic_dataset as w; \
w(Path('$WORK/off/data'), 400, 60, 100, seed=0)" || exit 1
[ -d "$WORK/on/data" ] || cp -r "$WORK/off/data" "$WORK/on/data"

pids=()
for side in off on; do
  flag=$([ "$side" = on ] && echo true || echo false)
  for seed in $SEEDS; do
    for variant in b f; do
      OMP_NUM_THREADS=1 "$PY" benchmarks/wsss_synth.py --device cuda --iters "$ITERS" \
        --variants "$variant" --seed "$seed" --work "$WORK/$side" --out "$OUT/$side" \
        --set "loss.reference_warmup=$flag" >"$OUT/${side}_${variant}_seed${seed}.log" 2>&1 &
      pids+=($!)
    done
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "runs failed: $failed of ${#pids[@]}"
tail -n 3 "$OUT"/*.log
