# The study's four settings on SmolLM2 (sourced by run.sh), all on layers 10-29 at 1152:
# uncompressed, its defaults (wanda_sp + refit), ntk_cluster + refit, data-free ntk_cluster; compression at seed 0.
# shellcheck disable=SC2034  # used by the scripts that source this file
FIXED=(ffn_mode.seed=0 ffn_mode.calib.seed=0)
declare -A SETTINGS=(
  [none]="ffn_mode=none"
  [wanda_sp_refit]="ffn_mode=wanda_sp ${FIXED[*]}"
  [ntk_cluster_refit]="ffn_mode=ntk_cluster ${FIXED[*]}"
  [ntk_cluster_datafree]="ffn_mode=ntk_cluster ffn_mode.refit=none ${FIXED[*]}"
)
NAMES=(none wanda_sp_refit ntk_cluster_refit ntk_cluster_datafree)
