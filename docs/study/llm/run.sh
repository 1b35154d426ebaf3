#!/usr/bin/env bash
# The LLM side of the study (docs/study/llm/README.md): SmolLM2 uncompressed, with its defaults (wanda_sp +
# refit), ntk_cluster + refit and data-free ntk_cluster, all on layers 10-29 at 1152 (the same parameter
# count), each recovered with LoRA and with full fine-tuning, evaluated by lm-evaluation-harness's offline
# tasks before training (the LoRA run of seed 0: compression does not depend on the training seed) and
# after. Seeds vary the fine-tuning (data order, dropout, LoRA's initialisation); the compression is
# fixed at seed 0 (cached after its first run). About an hour on two CPU cores.
#   bash docs/study/llm/run.sh            # runs under logs/study_llm/{lora,full}/<setting>-s<seed>
#   python -m src.report logs/study_llm/lora --metric eval/hamlet_128/word_perplexity   (and full/, rt_verdict)
set -euo pipefail
OUT=${OUT:-logs/study_llm}
STEPS=${STEPS:-10}
COMMON=(task=rt_review model=smollm2 "trainer.max_steps=$STEPS" task.batch_size=8 task.max_eval_samples=16
        trainer.limit_val_batches=1 trainer.num_sanity_val_steps=0 approx_metrics.enabled=false test=false
        lm_eval.enabled=true "lm_eval.seq_lens=[128]" "lm_eval.limit={hamlet:2,rt_verdict:100}")
FIXED=(ffn_mode.seed=0 ffn_mode.calib.seed=0)
declare -A SETTINGS=(
  [none]="ffn_mode=none"
  [wanda_sp_refit]="ffn_mode=wanda_sp ${FIXED[*]}"
  [ntk_cluster_refit]="ffn_mode=ntk_cluster ${FIXED[*]}"
  [ntk_cluster_datafree]="ffn_mode=ntk_cluster ffn_mode.refit=none ${FIXED[*]}"
)
for seed in 0 1 2; do
  for s in none wanda_sp_refit ntk_cluster_refit ntk_cluster_datafree; do
    before=$([ "$seed" = 0 ] && echo true || echo false)
    # shellcheck disable=SC2086  # a setting is several overrides
    python -m src.train "${COMMON[@]}" ${SETTINGS[$s]} finetune=lora "lm_eval.before=$before" "seed=$seed" "hydra.run.dir=$OUT/lora/$s-s$seed"
    # shellcheck disable=SC2086
    python -m src.train "${COMMON[@]}" ${SETTINGS[$s]} finetune=full "seed=$seed" "hydra.run.dir=$OUT/full/$s-s$seed"
  done
done
