#!/usr/bin/env bash
# Hamlet at sequence length 2048 (SliceGPT's / Wanda's convention) for the study's runs (run.sh): lm-eval on each
# run's last checkpoint (src.evaluate merges eval/hamlet_2048/* into its results.json), and on each setting's
# compressed model before any step (train=false, compression cached at seed 0) under $OUT/before/<setting>.
#   OUT=logs/study_llm bash docs/study/llm/eval_2048.sh
set -euo pipefail
OUT=${OUT:-logs/study_llm}
EVAL=("lm_eval.tasks=[hamlet]" "lm_eval.seq_lens=[2048]" "lm_eval.limit={hamlet:2}")
for ckpt in "$OUT"/{lora,full}/*/checkpoints/last.ckpt; do
  python -m src.evaluate "ckpt_path=$ckpt" "${EVAL[@]}"
done
source "$(dirname "$0")/settings.sh"
for s in "${NAMES[@]}"; do
  # shellcheck disable=SC2086  # a setting is several overrides
  python -m src.train task=rt_review model=smollm2 train=false test=false task.max_eval_samples=16 approx_metrics.enabled=false \
    lm_eval.enabled=true "lm_eval.tasks=[hamlet]" "lm_eval.seq_lens=[128,2048]" "lm_eval.limit={hamlet:2}" \
    ${SETTINGS[$s]} seed=0 "hydra.run.dir=$OUT/before/$s"
done
