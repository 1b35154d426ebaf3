"""Truncated-SVD baseline at the parameter budget of a width-``mid_dim`` MLP."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import check_mid_dim, compute_dtype
from .types import LowRankMLP, MLPWeights

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


def svd_rank(h: int, d: int, mid_dim: int, gated: bool, biased: bool) -> int:
    """Largest r with n_mats·r·(h + d) <= mid_dim·P, P the sub-MLP length (153 for 768, 3072, 768).

    P = 2h + 1 (biased), 2h (no biases), 3h (gated), 3h + 2 (gated with biases, gpt-oss); n_mats = 2
    (3 gated). The biases of the low-rank MLP (up_bias has d entries, not k) are outside this budget.
    """
    point_dim = 3 * h + 2 * int(biased) if gated else 2 * h + int(biased)
    return mid_dim * point_dim // ((3 if gated else 2) * (h + d))


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int) -> LowRankMLP:
    """Replace up, down (and gate) by rank-r products ``(U_r S_r) @ V_rᵀ``; biases kept.

    ``seed`` is unused: the SVD is deterministic.
    """
    check_mid_dim(w, mid_dim)
    r = svd_rank(w.hidden_size, w.width, mid_dim, w.is_gated, w.up_bias is not None)
    if r < 1:
        raise ValueError(f"mid_dim={mid_dim} leaves an SVD rank of 0 for h={w.hidden_size}, d={w.width}")
    mats = {"up": w.up, "down": w.down, "gate": w.gate}
    factors = {name: _truncate(m, r) for name, m in mats.items() if m is not None}
    return LowRankMLP(
        factors=factors,
        up_bias=None if w.up_bias is None else w.up_bias.clone(),
        down_bias=None if w.down_bias is None else w.down_bias.clone(),
        activation=w.activation,
        stats={"rank": r},
        gate_bias=None if w.gate_bias is None else w.gate_bias.clone(),
    )


def _truncate(m: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Best rank-r factors (left [out, r], right [r, in]) of m [out, in]."""
    u, s, vh = torch.linalg.svd(m.to(compute_dtype(m)), full_matrices=False)
    return (u[:, :r] * s[:r]).to(m.dtype).contiguous(), vh[:r].to(m.dtype).contiguous()
