"""Activation-aware MLP fusion: the sub-MLPs that matter on the data kept exactly, the rest fused.

The ``t = round(keep · k)`` sub-MLPs of largest Wanda-sp score ‖down[:, i]‖₁ · ‖a_i‖₂ on the
calibration tokens stay as they are (each its own cluster, count 1); the other ``d − t`` are fused
by k-means into ``k − t`` clusters whose sizes are the frozen count scale, each point weighted by
its activation energy ‖a_i‖² in the centroid step. So it is MLP fusion (``ntk_cluster``: centroids,
frozen counts, the NTK argument) on the neurons Wanda-sp would drop, instead of dropping them
(docs/methods.md, "ntk_keep"). Needs calibration data.
"""

from __future__ import annotations

import torch

from .common import activations, check_mid_dim, mlp_from_points, sub_mlp_points, top_sub_mlps
from .kmeans import kmeans
from .types import FusedMLP, MLPCalibration, MLPWeights, OptionError
from .wanda_sp import scores

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "2"  # 2: the Wanda-sp score takes the column's L1 norm (was L2)


def check(width: int, mid_dim: int, *, keep: float = 0.5, **_: object) -> None:
    """``keep`` is the fraction of the k new neurons that are original neurons kept exactly, in (0, 1)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
        raise OptionError("keep", keep, "must be a fraction in (0, 1): the share of mid_dim kept as original neurons.")
    if mid_dim < 2:
        raise OptionError("keep", keep, f"needs mid_dim >= 2 (one kept neuron and one cluster), got {mid_dim}.")


def needs_calibration(**_: object) -> bool:
    """Always: the kept neurons and the k-means weights read the calibration activations."""
    return True


def split(mid_dim: int, keep: float) -> int:
    """How many of the ``mid_dim`` new neurons are kept original ones: at least 1, at most ``mid_dim − 1``."""
    return min(mid_dim - 1, max(1, round(keep * mid_dim)))


@torch.no_grad()
def compress(
    w: MLPWeights, mid_dim: int, *, seed: int, calib: MLPCalibration, keep: float = 0.5, n_init: int = 3,
    max_iter: int = 100, tol: float = 1e-4,
) -> FusedMLP:
    """Width ``mid_dim``: the top ``split(mid_dim, keep)`` neurons by Wanda-sp score exactly, then the
    centroids of the others; ``scale`` [k] = 1 for the kept ones, the cluster sizes for the fused."""
    check_mid_dim(w, mid_dim)
    check(w.width, mid_dim, keep=keep)
    a = activations(w, calib.x)  # [T, d]
    score = scores(w, calib, a)  # [d]
    t = split(mid_dim, keep)
    kept, rest = top_sub_mlps(w, t, score)
    points = sub_mlp_points(w)  # [d, P]
    # at k = d every remaining point is its own cluster (kmeans keeps them in order): the original MLP, permuted
    km = kmeans(points[rest], mid_dim - t, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, weights=a[:, rest].pow(2).sum(0))
    scale = torch.cat([points.new_ones(t), km.counts.to(points)])  # [k], on the weights' device
    stats = {"kept": float(t), "kept_score_frac": (score[kept].sum() / score.sum()).item(), "inertia": km.inertia}
    return FusedMLP(mlp_from_points(torch.cat([points[kept], km.centroids]), w), scale=scale.to(w.up.dtype), stats=stats)
