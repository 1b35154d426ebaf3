"""Magnitude pruning baseline: keep the ``mid_dim`` sub-MLPs of largest norm product."""

from __future__ import annotations

import torch

from .common import check_mid_dim, importance, mlp_from_points, sub_mlp_points, top_sub_mlps
from .types import FusedMLP, MLPWeights

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int) -> FusedMLP:
    """Keep the top ``mid_dim`` sub-MLPs by ‖up_i‖·‖down_i‖ (·‖gate_i‖ gated), in original order.

    ``seed`` is unused: pruning is deterministic (ties keep the lower index).
    """
    check_mid_dim(w, mid_dim)
    keep, _ = top_sub_mlps(w, mid_dim)
    score = importance(w)
    stats = {"kept_importance_frac": (score[keep].sum() / score.sum()).item()}
    return FusedMLP(mlp_from_points(sub_mlp_points(w)[keep], w), stats=stats)
