"""Activation fusion: MLP fusion with the neurons' similarity taken on the data, where a gated MLP is linear.

The paper's fusion clusters neurons by their weights, which works for ``act(W1 x)`` MLPs whose neurons
are points in one space, and breaks a gated ``act(gate x) · (up x)`` MLP (docs/study/llm). Here a
neuron is what it outputs: the MLP's output is ``Σ_i down[:, i] a_i``, linear in the activations a_i
[T] over the calibration tokens, so a neuron j whose activation is close to a multiple of another's,
a_j ≈ c a_r, can be folded into r: ``down[:, r] += c · down[:, j]`` with c = ⟨a_j, a_r⟩ / ‖a_r‖² (least
squares), at a cost in output of ‖down[:, j]‖² ‖a_j‖² sin²θ_jr (θ: the angle between a_j and a_r).

Greedily, ``d − k`` times, the neuron whose fold costs least is folded into its best partner among the
neurons left (a partner keeps its gate and up rows: the mean of two gates is not a gate of the mean;
its down column carries what it absorbed, which later folds take along). A neuron with no similar
partner costs its whole output energy, so the rule never does worse than dropping it, and where
neurons fire together it merges them at little cost. As in MLP fusion each kept neuron's count of
absorbed neurons n_c is a frozen scale and its down column is divided by it (the same outputs;
docs/methods.md, "act_fusion"). A refit or bias compensation (``ffn_mode.refit``) corrects what is left.
Model folding and ZipIt merge neurons by activation correlation in the same spirit. Needs calibration data.
"""

from __future__ import annotations

import torch

from .common import activations, check_mid_dim, mlp_from_points, sub_mlp_points
from .types import FusedMLP, MLPCalibration, MLPWeights

# Bumped whenever this method's output changes: part of the compression cache key.
VERSION = "2"  # 2: greedy least-cost folds (was energy-weighted k-means of activation directions)


def needs_calibration(**_: object) -> bool:
    """Always: neurons are compared by their calibration activations."""
    return True


@torch.no_grad()
def compress(w: MLPWeights, mid_dim: int, *, seed: int, calib: MLPCalibration) -> FusedMLP:
    """Width ``mid_dim``: ``d − mid_dim`` least-cost folds; ``scale`` [k] = each kept neuron's count (``seed`` unused)."""
    check_mid_dim(w, mid_dim)
    a = activations(w, calib.x).double()  # [T, d]
    gram = a.T @ a  # [d, d]
    sq = gram.diagonal().clamp_min(1e-30)  # ‖a_i‖², [d]
    cos2 = gram.pow(2) / (sq[:, None] * sq[None, :])  # [d, d]; a folded neuron's column is set to -1
    cos2.fill_diagonal_(-1.0)  # never a neuron's own partner
    best, partner = cos2.max(1)  # [d]: each neuron's most similar neuron left
    down = w.down.double().clone()  # [h, d]: each neuron's down column with what it absorbed
    col2 = down.pow(2).sum(0)  # [d]
    alive = torch.ones(w.width, dtype=torch.bool, device=a.device)
    counts = torch.ones(w.width, dtype=torch.float64, device=a.device)
    lost = 0.0
    for _ in range(w.width - mid_dim):
        cost = (col2 * sq * (1 - best.clamp(0, 1))).masked_fill(~alive, float("inf"))  # output energy a fold loses, [d]
        j = int(cost.argmin())
        r = int(partner[j])
        down[:, r] += gram[j, r] / sq[r] * down[:, j]
        col2[r] = down[:, r].pow(2).sum()
        counts[r] += counts[j]
        alive[j] = False
        lost += float(cost[j])
        cos2[:, j] = -1.0
        stale = alive & (partner == j)  # neurons whose best partner was j look again
        if stale.any():
            best[stale], partner[stale] = cos2[stale].max(1)
    kept = alive.nonzero().flatten()  # in original order
    points = sub_mlp_points(w)[kept].clone()  # [k, P]
    points[:, -w.hidden_size :] = (down[:, kept] / counts[kept]).T.to(points.dtype)  # the down column: a point's last h entries
    energy = (w.down.double().pow(2).sum(0) * sq).sum()
    return FusedMLP(mlp_from_points(points, w), scale=counts[kept].to(w.up), stats={"lost_energy_frac": lost / float(energy)})
