"""Activation fusion: MLP fusion with the neurons' similarity taken on the data, where a gated MLP is linear.

The paper's fusion clusters neurons by their weights, which works for ``act(W1 x)`` MLPs whose neurons
are points in one space, and breaks a gated ``act(gate x) · (up x)`` MLP (docs/study/llm). Here a
neuron is what it outputs: its activation a_i [T] over the calibration tokens, the coefficient of its
down column in the MLP's output ``Σ_i down[:, i] a_i``. Neurons whose activations point the same way
can share one: k-means on the unit vectors a_i / ‖a_i‖ (on at most ``max_tokens`` tokens), each
weighted by its output energy e_i = ‖down[:, i]‖² ‖a_i‖², so that the cost of merging j into a
cluster is about e_j sin²θ, the output it loses. Each cluster keeps its most representative member's
gate and up rows (the largest Σ_j e_j cos²θ_ij over members j) and absorbs the others' outputs by
least squares, down'[:, c] = Σ_j down[:, j] ⟨a_j, a_r⟩ / ‖a_r‖²; as in MLP fusion, the cluster's
size n_c is a frozen scale and the down column is divided by it (the same outputs; docs/methods.md,
"act_fusion"). A refit or bias compensation (``ffn_mode.refit``) then corrects what is left. Model
folding and ZipIt merge neurons by activation correlation in the same way. Needs calibration data.
"""

from __future__ import annotations

import torch

from .common import activations, check_mid_dim, mlp_from_points, sub_mlp_points
from .kmeans import kmeans
from .types import FusedMLP, MLPCalibration, MLPWeights, OptionError

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "1"


def check(width: int, mid_dim: int, *, max_tokens: int = 2048, **_: object) -> None:
    """``max_tokens`` (tokens the similarity is measured on) is a positive int."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise OptionError("max_tokens", max_tokens, "must be a positive integer: the calibration tokens the neurons' similarity is measured on.")


def needs_calibration(**_: object) -> bool:
    """Always: neurons are compared by their calibration activations."""
    return True


@torch.no_grad()
def compress(
    w: MLPWeights, mid_dim: int, *, seed: int, calib: MLPCalibration, max_tokens: int = 2048, n_init: int = 1,
    max_iter: int = 50, tol: float = 1e-4,
) -> FusedMLP:
    """Width ``mid_dim``: a representative per activation cluster, the others' outputs folded into its down column;
    ``scale`` [k] = the cluster sizes."""
    check_mid_dim(w, mid_dim)
    check(w.width, mid_dim, max_tokens=max_tokens)
    a = activations(w, calib.x)  # [T, d]
    norm = a.norm(dim=0).clamp_min(1e-12)  # [d]
    energy = w.down.to(a.dtype).pow(2).sum(0) * norm**2  # [d]: each neuron's output energy on the calibration tokens
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(a), generator=gen)[:max_tokens].sort().values.to(a.device)
    u = (a[rows] / norm).T.contiguous()  # [d, t]: unit directions (on the sampled tokens)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    km = kmeans(u, mid_dim, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, weights=energy)
    points = sub_mlp_points(w)  # [d, P]
    reps, downs = [], []
    down = w.down.to(a.dtype)  # [h, d]
    for c in range(mid_dim):
        members = (km.labels == c).nonzero().flatten()
        au = a[:, members] / norm[members]  # [T, m] unit activations
        cos2 = (au.T @ au).pow(2)  # [m, m]
        r = members[(cos2 @ energy[members]).argmax()]
        coef = (a[:, members].T @ a[:, r]) / a[:, r].pow(2).sum().clamp_min(1e-12)  # [m]: least-squares scale onto a_r
        reps.append(r)
        downs.append(down[:, members] @ coef / len(members))  # [h], divided by the count the scale restores
    reps_t = torch.stack(reps)
    new = points[reps_t].clone()
    new[:, -w.hidden_size :] = torch.stack(downs).to(new.dtype)  # the down column is the point's last h entries
    kept = energy[reps_t].sum() / energy.sum()
    return FusedMLP(mlp_from_points(new, w), scale=km.counts.to(w.up), stats={"inertia": km.inertia, "kept_energy_frac": kept.item()})
