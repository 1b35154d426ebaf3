"""Random Gaussian sketching baseline, optionally keeping the largest sub-MLPs exactly."""

from __future__ import annotations

import math

import torch

from .common import check_mid_dim, mlp_from_points, sub_mlp_points, top_sub_mlps
from .types import FusedMLP, MLPWeights, OptionError

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


def check(width: int, mid_dim: int, *, sketch_keep: int = 0, **_: object) -> None:
    """``sketch_keep`` must be below ``mid_dim``, except t = k = d, which keeps the MLP as it is."""
    if not (0 <= sketch_keep < mid_dim or sketch_keep == mid_dim == width):
        raise OptionError("sketch_keep", sketch_keep, f"must be in 0..mid_dim-1 = 0..{mid_dim - 1}.")


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int, sketch_keep: int = 0) -> FusedMLP:
    """Keep the ``sketch_keep`` = t largest sub-MLPs, sketch the other d - t into mid_dim - t.

    S [d - t, k - t] has N(0, 1/(k - t)) entries (E[S Sᵀ] = I) and mixes whole sub-MLPs:
    up' = Sᵀ up_rest, b' = Sᵀ b_rest, down' = down_rest S (gate' = Sᵀ gate_rest); see ``check``.
    """
    check_mid_dim(w, mid_dim)
    check(w.width, mid_dim, sketch_keep=sketch_keep)
    d, t = w.width, sketch_keep
    points = sub_mlp_points(w)  # [d, P]
    keep, rest = top_sub_mlps(w, t)
    parts, m = [points[keep]], mid_dim - t
    if m:
        gen = torch.Generator(device=points.device).manual_seed(seed)
        s = torch.randn(d - t, m, generator=gen, device=points.device, dtype=points.dtype)
        parts.append(s.T @ points[rest] / math.sqrt(m))  # [m, P]
    return FusedMLP(mlp_from_points(torch.cat(parts), w), stats={"sketch_keep": t})
