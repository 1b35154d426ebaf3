#!/usr/bin/env bash
# LoRA recovery against full fine-tuning on SmolLM2 with its defaults (wanda_sp + refit on layers 10-29
# at 1152): 200 steps at batch 8 and lr 1e-4 (LLM-Pruner's LoRA recovery rate), val/ppl on 64 validation
# sources every 50 steps, Hamlet perplexity (lm-eval, first two scenes, length 128) after training, step
# time and peak memory; seeds vary the fine-tuning, the compression is fixed at seed 0 (cached). Runs
# alternate LoRA and full per seed, so a cut-short study still gives pairs. About 25 min a run on two CPU cores.
#   bash docs/study/llm/recovery.sh       # runs under logs/study_llm_recovery/{lora,full}-s<seed>
#   python -m src.report logs/study_llm_recovery --metric val/ppl --at-step 50   (and 200)
set -euo pipefail
OUT=${OUT:-logs/study_llm_recovery}
STEPS=${STEPS:-200}
COMMON=(task=rt_review model=smollm2 "trainer.max_steps=$STEPS" trainer.val_check_interval=50
        task.batch_size=8 task.max_eval_samples=64 trainer.num_sanity_val_steps=0 approx_metrics.enabled=false
        test=false ffn_mode.seed=0 ffn_mode.calib.seed=0
        lm_eval.enabled=true "lm_eval.tasks=[hamlet]" "lm_eval.seq_lens=[128]" "lm_eval.limit={hamlet:2}")
for seed in ${SEEDS:-0 1 2}; do
  for ft in lora full; do
    python -m src.train "${COMMON[@]}" "finetune=$ft" "seed=$seed" "hydra.run.dir=$OUT/$ft-s$seed"
  done
done
