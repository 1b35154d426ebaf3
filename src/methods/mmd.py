"""MMD baseline: k particles moved by AdamW to minimise the MMD to the d sub-MLP points."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .common import check_mid_dim, mlp_from_points, sub_mlp_points
from .types import FusedMLP, MLPWeights, OptionError

log = logging.getLogger(__name__)

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


def check(width: int, mid_dim: int, *, mmd_steps: int = 100, lr: float = 1e-2, **_: object) -> None:
    """At least one AdamW step, at a positive learning rate."""
    if isinstance(mmd_steps, bool) or not isinstance(mmd_steps, int) or mmd_steps < 0:
        raise OptionError("mmd_steps", mmd_steps, "must be a non-negative integer.")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise OptionError("lr", lr, "must be a positive number.")


@torch.no_grad()
def compress(
    w: MLPWeights, mid_dim: int, *, seed: int, mmd_steps: int = 100, lr: float = 1e-2
) -> FusedMLP:
    """``mid_dim`` particles fitted to the sub-MLP points by MMD, each folded with √(d/k).

    The particles start as distinct random sub-MLPs; ``mmd_steps`` AdamW steps minimise the biased
    MMD² with kernel Σ_q exp(-‖a - b‖ / (bw·2^q)), q = -2..2, bw the mean pairwise distance of the
    points and initial particles (kept fixed). Each particle stands for d/k neurons, so √(d/k) is
    folded in as ``cluster`` folds √n; ``down_bias`` is left as it is.
    """
    check_mid_dim(w, mid_dim)
    check(w.width, mid_dim, mmd_steps=mmd_steps, lr=lr)
    x = sub_mlp_points(w)  # [d, P]
    d = x.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    y = x[torch.randperm(d, generator=gen, device=x.device)[:mid_dim]]  # [k, P], a copy

    everything = torch.cat([x, y])
    dist_all = _dist(everything, everything)  # [d + k, d + k]
    bw = dist_all.sum().item() / (len(everything) * (len(everything) - 1))  # diagonal ~ 0
    bws = [bw * 2.0**q for q in range(-2, 3)]
    kxx = _kernel(dist_all[:d, :d], bws).mean()  # the constant term of MMD²
    del everything, dist_all

    def mmd2(y: Tensor) -> Tensor:
        return kxx + _kernel(_dist(y, y), bws).mean() - 2 * _kernel(_dist(y, x), bws).mean()

    mmd_init = mmd2(y).item()
    with torch.enable_grad():  # only for the particles; the function runs under no_grad
        y.requires_grad_(True)
        opt = torch.optim.AdamW([y], lr=lr)  # torch defaults otherwise (weight decay 0.01)
        for _ in range(mmd_steps):
            opt.zero_grad(set_to_none=True)
            mmd2(y).backward()
            opt.step()
    y = y.detach()
    mmd_final = mmd2(y).item()
    log.debug("MMD² %.4g -> %.4g in %d steps", mmd_init, mmd_final, mmd_steps)
    fold = torch.full((mid_dim,), math.sqrt(d / mid_dim), device=x.device, dtype=x.dtype)
    stats = {"mmd_init": mmd_init, "mmd_final": mmd_final}
    return FusedMLP(mlp_from_points(y, w, fold=fold), stats=stats)


def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [len(a), len(b)]; the clamp keeps the gradient finite (zero) at a = b."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
    return d2.clamp_min(1e-12).sqrt()


def _kernel(dist: Tensor, bws: list[float]) -> Tensor:
    """Σ_q exp(-dist / bw_q), the shape of ``dist``."""
    return sum(torch.exp(-dist / bw) for bw in bws)
