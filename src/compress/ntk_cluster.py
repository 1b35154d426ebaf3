"""MLP fusion (the paper's method): k-means on the sub-MLPs, cluster sizes kept as a frozen scale."""

from __future__ import annotations

import logging

import torch

from .common import check_mid_dim, mlp_from_points, sub_mlp_points
from .kmeans import KMeansResult, kmeans
from .types import FusedMLP, MLPWeights

log = logging.getLogger(__name__)

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


def cluster_sub_mlps(
    w: MLPWeights, mid_dim: int, *, seed: int, n_init: int, max_iter: int, tol: float
) -> tuple[KMeansResult, dict[str, float]]:
    """k-means of the d sub-MLP points into ``mid_dim`` clusters, and the stats to report."""
    check_mid_dim(w, mid_dim)
    km = kmeans(sub_mlp_points(w), mid_dim, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol)
    log.debug("k-means %d -> %d: inertia %.4g after %d iterations", w.width, mid_dim, km.inertia, km.n_iter)
    stats = {"inertia": km.inertia, "kmeans_iters": km.n_iter, "empty_clusters_fixed": km.empty_fixed}
    return km, stats


@torch.no_grad()
def compress(
    w: MLPWeights, mid_dim: int, *, seed: int, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4
) -> FusedMLP:
    """Fuse ``w`` to width ``mid_dim``: centroids as the new neurons, ``scale`` = cluster sizes [k].

    The layer computes ``down(scale * act(up x + b)) + b_out``; ``scale`` stays frozen in training.
    """
    km, stats = cluster_sub_mlps(w, mid_dim, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol)
    return FusedMLP(mlp_from_points(km.centroids, w), scale=km.counts.to(w.up.dtype), stats=stats)
