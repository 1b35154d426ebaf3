#!/usr/bin/env bash
# Recovery by the language-model loss against logit distillation from the uncompressed model (distill=logits:
# the KL to the frozen original's next-token distribution alone, Minitron's recovery), on SmolLM2 compressed by
# its defaults (wanda_sp + held-out refit, layers 10-29 at 1152) and, with SIZES="s1 s2", at width 768 (19.7 %
# of the parameters removed, the quality study's s2); finetune=lora and full (FTS). STEPS steps at batch 8 and
# lr 1e-4, val/ppl on 64 validation sources and Hamlet perplexity (lm-eval, first two scenes, length 128) after
# training, step time, the teacher's share and peak memory. The compression is fixed at seed 0 (cached); seeds
# vary the fine-tuning. Runs go seed by seed, LM loss then distillation per cell, so a cut-short study still
# gives pairs; a finished run (results.json with "status": "completed") is skipped on a rerun.
#   bash docs/study/llm/distill.sh        # runs under docs/study/llm/distill/<size>/<ft>-<loss>-s<seed>
#   PYTHONPATH=. python docs/study/llm/distill_table.py  # the table with 95 % intervals (docs/study/llm/distill.md)
set -euo pipefail
OUT=${OUT:-docs/study/llm/distill}
STEPS=${STEPS:-100}
COMMON=(task=rt_review model=smollm2 "trainer.max_steps=$STEPS" "trainer.val_check_interval=$STEPS"
        task.batch_size=8 task.max_eval_samples=64 trainer.num_sanity_val_steps=0 approx_metrics.enabled=false
        test=false
        lm_eval.enabled=true "lm_eval.tasks=[hamlet]" "lm_eval.seq_lens=[128]" "lm_eval.limit={hamlet:2}")
FIXED=(ffn_mode.seed=0 ffn_mode.calib.seed=0)  # the compression fixed (cached); ffn_mode=none has neither
declare -A SIZE=([s1]="" [s2]="ffn_mode.mid_dim=768")
declare -A LOSS=([lm]="distill=none" [kl]="distill=logits")
# before any step, on the same validation sources and Hamlet scenes (train=false validates): the uncompressed
# model (the teacher) and each size's compressed one (n = 1: the compression is fixed)
declare -A BEFORE=([uncompressed]="ffn_mode=none" [s1/before]="${FIXED[*]}" [s2/before]="${FIXED[*]} ffn_mode.mid_dim=768")
for ref in uncompressed ${SIZES:-s1}; do
  [ "$ref" = uncompressed ] && key=uncompressed || key=$ref/before
  grep -qs '"status": "completed"' "$OUT/$key/results.json" && continue
  python -m src.train "${COMMON[@]}" ${BEFORE[$key]} train=false "hydra.run.dir=$OUT/$key"
done
for seed in ${SEEDS:-0 1 2}; do
  for size in ${SIZES:-s1}; do
    for ft in ${FTS:-lora full}; do
      for loss in lm kl; do
        dir=$OUT/$size/$ft-$loss-s$seed
        grep -qs '"status": "completed"' "$dir/results.json" && continue
        python -m src.train "${COMMON[@]}" "${FIXED[@]}" ${SIZE[$size]} "${LOSS[$loss]}" "finetune=$ft" "seed=$seed" "hydra.run.dir=$dir"
        rm -rf "$dir/checkpoints"  # 0.5-1.5 GB a run; the study keeps results.json, metrics.csv, train.log, .hydra
      done
    done
  done
done
