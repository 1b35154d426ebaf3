"""MLP fusion (the paper's method): k-means on the sub-MLPs, cluster sizes kept as a frozen scale."""

from __future__ import annotations

import logging

import torch

from .common import activations, check_mid_dim, mlp_from_points, sub_mlp_points
from .kmeans import KMeansResult, kmeans
from .types import FusedMLP, MLPCalibration, MLPWeights, OptionError

log = logging.getLogger(__name__)

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


WEIGHTINGS = ("none", "activation")


def check(width: int, mid_dim: int, *, weighting: str = "none", calib_size: int = 0, **_: object) -> None:
    """``weighting`` is none or activation; activation weighting needs calibration data."""
    if weighting not in WEIGHTINGS:
        raise OptionError("weighting", weighting, f"must be one of {list(WEIGHTINGS)}.")
    if weighting == "activation" and calib_size == 0:
        raise OptionError("weighting", weighting, "needs calibration data, but ffn_mode.calib.size=0.")


def needs_calibration(*, weighting: str = "none", **_: object) -> bool:
    """Activation weighting reads the calibration tokens; plain k-means is data-free."""
    return weighting == "activation"


def cluster_sub_mlps(
    w: MLPWeights, mid_dim: int, *, seed: int, n_init: int, max_iter: int, tol: float, weighting: str = "none",
    calib: MLPCalibration | None = None,
) -> tuple[KMeansResult, dict[str, float]]:
    """k-means of the d sub-MLP points into ``mid_dim`` clusters, and the stats to report.

    ``weighting="activation"`` weights each point by its activation energy ‖a_i‖² on the
    calibration tokens in Lloyd's centroid step (docs/methods.md section 6); counts stay neuron counts.
    """
    check_mid_dim(w, mid_dim)
    check(w.width, mid_dim, weighting=weighting, calib_size=0 if calib is None else len(calib.x))
    weights = activations(w, calib.x).pow(2).sum(0) if weighting == "activation" else None  # [d]
    km = kmeans(sub_mlp_points(w), mid_dim, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, weights=weights)
    log.debug("k-means %d -> %d: inertia %.4g after %d iterations", w.width, mid_dim, km.inertia, km.n_iter)
    stats = {"inertia": km.inertia, "kmeans_iters": km.n_iter, "empty_clusters_fixed": km.empty_fixed}
    return km, stats


@torch.no_grad()
def compress(
    w: MLPWeights, mid_dim: int, *, seed: int, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4,
    weighting: str = "none", calib: MLPCalibration | None = None,
) -> FusedMLP:
    """Fuse ``w`` to width ``mid_dim``: centroids as the new neurons, ``scale`` = cluster sizes [k].

    The layer computes ``down(scale * act(up x + b)) + b_out``; ``scale`` stays frozen in training.
    """
    km, stats = cluster_sub_mlps(w, mid_dim, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, weighting=weighting, calib=calib)
    return FusedMLP(mlp_from_points(km.centroids, w), scale=km.counts.to(w.up.dtype), stats=stats)
