"""Plain k-means clustering baseline: like MLP fusion, but √(cluster size) folded into the weights."""

from __future__ import annotations

import torch

from .common import mlp_from_points
from .ntk_cluster import check, cluster_sub_mlps, needs_calibration  # noqa: F401  (check, needs_calibration: the same options as ntk_cluster)
from .types import FusedMLP, MLPCalibration, MLPWeights

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


@torch.no_grad()
def compress(
    w: MLPWeights, mid_dim: int, *, seed: int, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4,
    weighting: str = "none", calib: MLPCalibration | None = None,
) -> FusedMLP:
    """Cluster the sub-MLPs and fold √n_j into neuron j (no separate scale).

    Plain MLPs: into the up row, up bias and down column. Gated MLPs: into the gate row and down
    column. With ReLU the output then equals ``ntk_cluster``'s at the start; with GELU/SiLU it
    does not, and in every case the trainable weights carry the scale.
    """
    km, stats = cluster_sub_mlps(w, mid_dim, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, weighting=weighting, calib=calib)
    fold = km.counts.to(km.centroids.dtype).sqrt()
    return FusedMLP(mlp_from_points(km.centroids, w, fold=fold), stats=stats)
