#!/usr/bin/env bash
# The whole flow on the embedded default, on a CPU, offline (`make demo`):
#   phantom data → tiny base model (pre-trained on phantom captions, cached) → stage 1 (basic
#   curriculum) → stage 2 (mix annealing toward clean QA) → test-split evaluation → comparison (stage 1 vs 2, per checkpoint) →
#   diagnostics report and model card of stage 2 (diagnostics run at every checkpoint save; written
#   offline into $OUT/stage2/report and $OUT/stage2/adapter/README.md, never pushed).
# FAMILY=paligemma, medgemma or qwen2_5_vl bash recipes/demo.sh runs that family instead.
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILY=${FAMILY:-llava}
OUT=${OUT:-runs/demo-${FAMILY}-$(date +%Y%m%d-%H%M%S)}
start=$(date +%s)

python recipes/stage1.py "recipes/configs/demo_${FAMILY}_stage1.yaml" --output_dir "$OUT/stage1"
python recipes/stage2.py "recipes/configs/demo_${FAMILY}_stage2.yaml" --output_dir "$OUT/stage2" \
    --init_adapter "$OUT/stage1/adapter"
python eval/compare.py "$OUT/stage1" "$OUT/stage2" --output "$OUT/compare" --print
# the final probe's default size (128 lesions, FINAL_PROBE_EXAMPLES): the trust verdicts do not flip between runs
python diagnostics/run_diagnostics.py "$OUT/stage2" --probe-final
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT"
