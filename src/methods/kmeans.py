"""Seeded k-means (greedy k-means++ and Lloyd) in torch, with the restarts run as one batch.

The restarts share every matmul (one GEMM gives the ``[n, R·k]`` distances), so the work stays in
BLAS rather than in Python. Runs on the device of the points and draws only from its own
``torch.Generator``, so a seed gives the same clusters on a given device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KMeansResult:
    centroids: Tensor  # [k, D], the mean of the points in each cluster
    labels: Tensor  # [n] int64
    counts: Tensor  # [k] int64, all >= 1
    inertia: float  # sum of squared distances of the points to their centroid
    n_iter: int  # Lloyd iterations of the batch of restarts
    empty_fixed: int  # clusters that went empty and were re-seeded (winning restart)


@torch.no_grad()
def kmeans(
    x: Tensor, k: int, *, seed: int, n_init: int = 3, max_iter: int = 100, tol: float = 1e-4, identity_at_n: bool = True,
    weights: Tensor | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` [n, D] into ``k`` clusters; keeps the best of ``n_init`` restarts.

    Lloyd stops when no label changes or when the squared centroid shift summed over clusters is
    below ``tol`` times the mean per-feature variance of ``x`` (sklearn's rule). ``k == n`` returns
    every point as its own cluster, exactly and in order, unless ``identity_at_n`` is False (then
    Lloyd runs, and finds the same clusters in another order). ``weights`` [n] (>= 0) make each
    centroid the weighted mean of its points and the inertia weighted (the seeding and the counts
    are not). Deterministic for a seed on a device.
    """
    n = x.shape[0]
    if x.ndim != 2:
        raise ValueError(f"points must be [n, D], got {tuple(x.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init}, {max_iter}")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(dtype)
    if weights is not None:
        assert weights.shape == (n,) and (weights >= 0).all(), "weights must be [n], non-negative"
        # a floor keeps a cluster of all-zero-weight points (dead neurons) at their plain mean
        weights = weights.to(dtype).clamp_min(1e-9 * max(weights.max().item(), 1e-30))
    if k == n and identity_at_n:
        ones = torch.ones(n, dtype=torch.long, device=x.device)
        return KMeansResult(x.clone(), torch.arange(n, device=x.device), ones, 0.0, 0, 0)

    gen = torch.Generator(device=x.device).manual_seed(seed)
    x2 = (x * x).sum(1)  # [n]
    c = _kmeans_pp(x, x2, k, n_init, gen)  # [R, k, D]
    tol = tol * x.var(0).mean().item()
    labels, n_fixed = None, torch.zeros(n_init, dtype=torch.long)
    for n_iter in range(1, max_iter + 1):
        # squared distances less the constant x2 [n, R, k], all restarts in one GEMM
        d2 = torch.addmm((c * c).sum(-1).view(1, -1), x, c.view(-1, x.shape[1]).T, alpha=-2)
        dmin, new = d2.view(n, n_init, k).min(-1)
        dmin, new = dmin.T, new.T.contiguous()  # [R, n]
        if labels is not None and torch.equal(new, labels):
            break  # the centroids already are the means of these labels
        labels = new
        counts = _bincount(labels, k)  # [R, k]
        if (counts == 0).any():
            n_fixed += _fix_empty(labels, counts, dmin + x2)
        c_old, c = c, _means(x, labels, counts, weights)
        if ((c - c_old) ** 2).sum((1, 2)).max().item() <= tol:
            break

    sq = ((x - c.gather(1, labels.unsqueeze(-1).expand(-1, -1, x.shape[1]))) ** 2).sum(-1)  # [R, n]
    inertia = (sq if weights is None else sq * weights).sum(1)
    r = int(inertia.argmin())
    return KMeansResult(c[r], labels[r], counts[r], inertia[r].item(), n_iter, int(n_fixed[r]))


def _kmeans_pp(x: Tensor, x2: Tensor, k: int, n_init: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ (sklearn's: best of 2 + ln k candidates per step), ``n_init`` at once."""
    n, R = x.shape[0], n_init
    trials = 2 + int(math.log(k))
    rows = torch.arange(R, device=x.device)
    idx = torch.empty(R, k, dtype=torch.long, device=x.device)
    idx[:, 0] = torch.randint(n, (R,), generator=gen, device=x.device)
    closest = torch.addmm(x2[idx[:, 0], None] + x2, x[idx[:, 0]], x.T, alpha=-2).clamp_min_(0)
    for j in range(1, k):
        # sample candidates with probability ~ squared distance to the closest center [R, n];
        # right=True never picks a zero-weight point (a duplicate of a center) while weight is left
        cum = closest.cumsum(1)
        u = torch.rand(R, trials, generator=gen, device=x.device, dtype=x.dtype) * cum[:, -1:]
        cand = torch.searchsorted(cum, u, right=True).clamp_max_(n - 1).flatten()  # [R * trials]
        d2 = torch.addmm(x2[cand, None] + x2, x[cand], x.T, alpha=-2).view(R, trials, n)
        d2 = torch.minimum(d2, closest.unsqueeze(1))
        best = d2.sum(-1).argmin(1)  # [R], the candidate that lowers the potential most
        idx[:, j] = cand.view(R, trials)[rows, best]
        closest = d2[rows, best].clamp_min_(0)
    return x[idx]  # [R, k, D]


def _bincount(labels: Tensor, k: int) -> Tensor:
    """Cluster sizes [R, k] of labels [R, n]."""
    counts = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels))


def _means(x: Tensor, labels: Tensor, counts: Tensor, weights: Tensor | None = None) -> Tensor:
    """Centroids [R, k, D] of x [n, D] under labels [R, n] (every cluster non-empty), weighted by ``weights`` [n]."""
    if weights is not None:  # weighted sums over the weight totals: the means of [w x, w]
        sums = _means(torch.cat([x * weights[:, None], weights[:, None]], 1), labels, counts)
        return sums[..., :-1] / sums[..., -1:]
    R, k = counts.shape
    if x.is_cuda:
        # index_add_ uses float atomics on CUDA (run-to-run noise); a one-hot matmul does not
        onehot = torch.zeros(R, k, x.shape[0], dtype=x.dtype, device=x.device)
        sums = onehot.scatter_(1, labels.unsqueeze(1), 1.0) @ x
    else:
        flat = (labels + k * torch.arange(R, device=x.device).unsqueeze(1)).flatten()  # [R*n]
        sums = x.new_zeros(R * k, x.shape[1]).index_add_(0, flat, x.repeat(R, 1)).view(R, k, -1)
    return sums / counts.unsqueeze(-1).to(x.dtype)


def _fix_empty(labels: Tensor, counts: Tensor, dist: Tensor) -> Tensor:
    """Re-seed empty clusters in place with the points farthest from their centroid.

    ``dist`` [R, n] is each point's squared distance to its centroid. One empty cluster at a
    time and only from clusters of two or more points, so no cluster is emptied in turn.
    Returns the number of clusters fixed per restart [R] (on the CPU).
    """
    fixed = torch.zeros(labels.shape[0], dtype=torch.long)
    for r in (counts == 0).any(1).nonzero().flatten().tolist():
        far = dist[r].clone()
        for j in (counts[r] == 0).nonzero().flatten().tolist():
            far[counts[r, labels[r]] < 2] = -math.inf
            p = int(far.argmax())
            counts[r, labels[r, p]] -= 1
            counts[r, j], labels[r, p], far[p] = 1, j, -math.inf
            fixed[r] += 1
    return fixed
