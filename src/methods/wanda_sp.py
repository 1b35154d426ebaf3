"""Wanda-sp: structured activation-aware pruning, the usual baseline of LLM width pruning.

Keeps the ``mid_dim`` neurons with the largest ‖down[:, i]‖₁ · ‖a_i‖₂, a_i = neuron i's activation
over the calibration tokens (act(gate)·up for gated MLPs): the structured form of Wanda's
|weight| × ‖activation‖ score, with the L1 norm of the column as FLAP's reference code scores a
channel (docs/methods.md, "wanda_sp"). Needs calibration data.
"""

from __future__ import annotations

import torch

from .common import activations, check_mid_dim, keep_top
from .types import FusedMLP, MLPCalibration, MLPWeights

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "2"  # 2: the column's L1 norm (was L2)


def needs_calibration(**_: object) -> bool:
    """Always: the score reads the calibration activations."""
    return True


def scores(w: MLPWeights, calib: MLPCalibration, acts: torch.Tensor | None = None) -> torch.Tensor:
    """‖down[:, i]‖₁ · ‖a_i‖₂ over the calibration tokens, [d]; ``acts`` [T, d]: the activations, if already computed."""
    a = activations(w, calib.x) if acts is None else acts
    return torch.linalg.vector_norm(w.down.to(a.dtype), ord=1, dim=0) * a.norm(dim=0)


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int, calib: MLPCalibration) -> FusedMLP:
    """Keep the top ``mid_dim`` neurons by activation-weighted norm, in original order (``seed`` unused)."""
    check_mid_dim(w, mid_dim)
    return keep_top(w, mid_dim, scores(w, calib))
