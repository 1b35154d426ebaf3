"""Least-squares refit of a compressed MLP's down projection on calibration tokens (docs/methods.md section 6).

With Z [T, k] the activations the down projection multiplies (ntk_cluster's frozen counts
included, so the scale stays as it is) and Y [T, h] the original MLP's outputs, the new down
weight W [h, k] (and bias b, where the layer has one) is the ridge solution of
``min ‖Z Wᵀ + 1 bᵀ − Y‖² + λ‖W‖²``, λ = ridge · mean(diag(Zc ᵀZc)) (Zc: Z centred when b is fitted).
For a rank-r ``svd`` layer the factor that multiplies the activations is re-fitted with the other
fixed: ``down = left @ right``, right = (leftᵀleft)⁻¹ leftᵀ W, the best such factor for the full
solution W (the error splits into the part in left's column space and the part outside it).
The result is kept only where it lowers the calibration error, so a refit never raises it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .common import activations
from .types import Compressed, FusedMLP, LowRankMLP, MLPCalibration, MLPWeights


def _dense(c: LowRankMLP) -> MLPWeights:
    """The dense MLP a low-rank one computes (factors multiplied out)."""
    mats = {name: left @ right for name, (left, right) in c.factors.items()}
    return MLPWeights(mats["up"], mats["down"], c.up_bias, c.down_bias, mats.get("gate"), c.activation, c.gate_bias)


def design(c: Compressed, x: Tensor) -> Tensor:
    """What the down projection multiplies on inputs x [T, h]: [T, k] (FusedMLP, times its scale) or [T, d]."""
    if isinstance(c, LowRankMLP):
        return activations(_dense(c), x)
    z = activations(c.weights, x)
    return z if c.scale is None else z * c.scale.to(z.dtype)


def output(c: Compressed, x: Tensor) -> Tensor:
    """The compressed MLP's output on x [T, h] -> [T, h], in the compute dtype."""
    w = _dense(c) if isinstance(c, LowRankMLP) else c.weights
    z = design(c, x)
    y = z @ w.down.to(z.dtype).T
    return y if w.down_bias is None else y + w.down_bias.to(y.dtype)


def rel_error(c: Compressed, calib: MLPCalibration) -> float:
    """‖MLP'(X) − Y‖_F / ‖Y‖_F on the calibration tokens."""
    y = calib.y.double()
    return (torch.linalg.norm(output(c, calib.x).double() - y) / torch.linalg.norm(y)).item()


@torch.no_grad()
def refit(c: Compressed, calib: MLPCalibration, ridge: float = 1e-3) -> Compressed:
    """``c`` with its down projection (and bias) re-fitted to the calibration outputs; see the module doc."""
    z, y = design(c, calib.x).double(), calib.y.double()  # [T, k], [T, h]
    has_bias = (c.down_bias if isinstance(c, LowRankMLP) else c.weights.down_bias) is not None
    mz, my = (z.mean(0), y.mean(0)) if has_bias else (0.0, 0.0)
    zc, yc = z - mz, y - my
    gram = zc.T @ zc  # [k, k]
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), zc.T @ yc).T  # [h, k]
    if isinstance(c, LowRankMLP):
        left, right = c.factors["down"]
        l64 = left.double()
        new_right = torch.linalg.solve(l64.T @ l64, l64.T @ w)  # [r, d]
        w = l64 @ new_right  # the down matrix the factors now apply, [h, d]: the bias goes with it
    b = (my - w @ mz) if has_bias else None
    if isinstance(c, LowRankMLP):
        factors = {**c.factors, "down": (left, new_right.to(right.dtype))}
        new: Compressed = dataclasses.replace(c, factors=factors, down_bias=None if b is None else b.to(left.dtype))
    else:
        dtype = c.weights.down.dtype
        weights = dataclasses.replace(c.weights, down=w.to(dtype).contiguous(), down_bias=None if b is None else b.to(dtype))
        new = dataclasses.replace(c, weights=weights)
    before, after = rel_error(c, calib), rel_error(new, calib)
    kept = new if after <= before else c
    return dataclasses.replace(kept, stats={**c.stats, "calib_err_before_refit": before, "calib_err": min(before, after)})
