"""Random Gaussian sketching baseline, optionally keeping the largest sub-MLPs exactly."""

from __future__ import annotations

import math

import torch

from .common import check_mid_dim, mlp_from_points, sub_mlp_points, top_sub_mlps
from .types import FusedMLP, MLPWeights


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int, sketch_keep: int = 0) -> FusedMLP:
    """Keep the ``sketch_keep`` = t largest sub-MLPs, sketch the other d - t into mid_dim - t.

    S [d - t, k - t] has N(0, 1/(k - t)) entries (E[S Sᵀ] = I) and mixes whole sub-MLPs:
    up' = Sᵀ up_rest, b' = Sᵀ b_rest, down' = down_rest S (gate' = Sᵀ gate_rest). ``sketch_keep``
    must be below ``mid_dim``, except t = k = d, which keeps the MLP as it is.
    """
    check_mid_dim(w, mid_dim)
    d, t = w.width, sketch_keep
    if not (0 <= t < mid_dim or t == mid_dim == d):
        raise ValueError(f"sketch_keep must be in [0, mid_dim={mid_dim}) (or = mid_dim = d), got {t}")
    points = sub_mlp_points(w)  # [d, P]
    keep, rest = top_sub_mlps(w, t)
    parts, m = [points[keep]], mid_dim - t
    if m:
        gen = torch.Generator(device=points.device).manual_seed(seed)
        s = torch.randn(d - t, m, generator=gen, device=points.device, dtype=points.dtype)
        parts.append(s.T @ points[rest] / math.sqrt(m))  # [m, P]
    return FusedMLP(mlp_from_points(torch.cat(parts), w), stats={"sketch_keep": t})
