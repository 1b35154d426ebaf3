"""Least-squares refit of a compressed MLP's down projection on calibration tokens (docs/methods.md section 6).

With Z [T, k] the activations the down projection multiplies (ntk_cluster's frozen counts
included, so the scale stays as it is) and Y [T, h] the original MLP's outputs, the new down
weight W [h, k] (and bias b, where the layer has one) is the ridge solution of
``min ‖Z Wᵀ + 1 bᵀ − Y‖² + λ‖W‖²``, λ = ridge · mean(diag(Zc ᵀZc)) (Zc: Z centred when b is fitted).
For a rank-r ``svd`` layer the factor that multiplies the activations is re-fitted with the other
fixed: ``down = left @ right``, right = (leftᵀleft)⁻¹ leftᵀ W, the best such factor for the full
solution W (the error splits into the part in left's column space and the part outside it).
The result is kept only where it lowers the calibration error, so a refit never raises it.

``ridge="auto"`` chooses ρ from ``RIDGES`` on held-out calibration sequences (every fifth one): each
ρ is fitted on the others and scored on them, the best is refitted on all tokens. Bias compensation
(``compensate``, FLAP's, for any method) leaves the weights and adds the mean of what the compressed
MLP misses to the down projection's bias.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .common import activations
from .types import Compressed, LowRankMLP, MLPCalibration, MLPWeights

REFITS = ("none", "lstsq", "bias")  # ffn_mode.refit: nothing, the least-squares refit, bias compensation
TOWARDS = ("zero", "compressed")  # ffn_mode.refit_toward: what the ridge shrinks the refit toward
# ρ candidates of ridge="auto" (relative to mean(diag(ZᵀZ)))
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_EVERY = 5  # ridge="auto" holds out every fifth calibration sequence


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


def seq_mean(t: Tensor, lengths: Tensor | None) -> Tensor:
    """The mean over calibration sequences of each sequence's mean of t [T, ...] (FLAP's baseline); no lengths: over tokens."""
    if lengths is None:
        return t.mean(0)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=t.device), lengths.to(t.device))
    sums = torch.zeros(len(lengths), *t.shape[1:], dtype=t.dtype, device=t.device).index_add_(0, seg, t)
    return (sums / lengths.to(t.device, t.dtype).reshape(-1, *[1] * (t.ndim - 1))).mean(0)


def _with_down_bias(c: Compressed, b: Tensor) -> Compressed:
    """``c`` with the down projection's bias ``b`` [h]."""
    if isinstance(c, LowRankMLP):
        return dataclasses.replace(c, down_bias=b.to(c.factors["down"][0].dtype))
    return dataclasses.replace(c, weights=dataclasses.replace(c.weights, down_bias=b.to(c.weights.down.dtype)))


@torch.no_grad()
def compensate(c: Compressed, calib: MLPCalibration) -> Compressed:
    """``c`` with b_down += mean(Y − MLP'(X)): the mean output of what the compression removed, per
    calibration sequence then over sequences (``seq_mean``). For a pruned MLP this is FLAP's
    ``down[:, removed] · ā[removed]``; the weights are unchanged."""
    old = c.down_bias if isinstance(c, LowRankMLP) else c.weights.down_bias
    missing = seq_mean(calib.y.double() - output(c, calib.x).double(), calib.lengths)  # [h]
    new = _with_down_bias(c, missing if old is None else old.double() + missing)
    return dataclasses.replace(new, stats={**c.stats, "calib_err_before_refit": rel_error(c, calib), "calib_err": rel_error(new, calib)})


def _holdout(calib: MLPCalibration) -> tuple[MLPCalibration, MLPCalibration]:
    """(fit, held out): every ``HOLDOUT_EVERY``-th calibration sequence held out (without lengths, blocks of 32 tokens)."""
    lengths = calib.lengths
    if lengths is None:
        lengths = torch.tensor([min(32, len(calib.x) - s) for s in range(0, len(calib.x), 32)])
    held = torch.arange(len(lengths)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1  # [S]
    tokens = torch.repeat_interleave(held, lengths).to(calib.x.device)  # [T]
    return (MLPCalibration(calib.x[~tokens], calib.y[~tokens], lengths[~held]),
            MLPCalibration(calib.x[tokens], calib.y[tokens], lengths[held]))


def choose_ridge(c: Compressed, calib: MLPCalibration, toward: str = "zero") -> tuple[float, dict[float, float]]:
    """The ρ of ``RIDGES`` with the lowest error on held-out calibration sequences, and each ρ's error."""
    fit, held = _holdout(calib)
    if len(held.x) == 0 or len(fit.x) == 0:
        return 1e-3, {}
    errors = {rho: rel_error(_solve(c, fit, rho, toward), held) for rho in RIDGES}
    return min(errors, key=errors.get), errors


@torch.no_grad()
def refit(c: Compressed, calib: MLPCalibration, ridge: float | str = 1e-3, toward: str = "zero") -> Compressed:
    """``c`` with its down projection (and bias) re-fitted to the calibration outputs; see the module doc.
    ``toward="compressed"`` shrinks the fit toward ``c``'s own down projection instead of toward zero."""
    rho = choose_ridge(c, calib, toward)[0] if ridge == "auto" else float(ridge)
    new = _solve(c, calib, rho, toward)
    before, after = rel_error(c, calib), rel_error(new, calib)
    kept = new if after <= before else c
    stats = {**c.stats, "calib_err_before_refit": before, "calib_err": min(before, after), **({"refit_ridge": rho} if ridge == "auto" else {})}
    return dataclasses.replace(kept, stats=stats)


def apply_refit(c: Compressed, calib: MLPCalibration, how: str, ridge: float | str = 1e-3, toward: str = "zero") -> Compressed:
    """``c`` after ``ffn_mode.refit`` (``how``, one of ``REFITS``) on ``calib``: re-fitted (lstsq), its bias compensated
    (bias), or as it is (none); its stats carry the calibration error either way."""
    if how == "lstsq":
        return refit(c, calib, ridge, toward)
    if how == "bias":
        return compensate(c, calib)
    return dataclasses.replace(c, stats={**c.stats, "calib_err": rel_error(c, calib)})


def _solve(c: Compressed, calib: MLPCalibration, ridge: float, toward: str = "zero") -> Compressed:
    """The ridge solution for ``c``'s down projection (and bias) on ``calib``, whatever its error: the penalty
    λ‖W − W0‖², W0 = 0 or (``toward="compressed"``) the down projection ``c`` has, [h, k]."""
    z, y = design(c, calib.x).double(), calib.y.double()  # [T, k], [T, h]
    has_bias = (c.down_bias if isinstance(c, LowRankMLP) else c.weights.down_bias) is not None
    mz, my = (z.mean(0), y.mean(0)) if has_bias else (0.0, 0.0)
    # centred only where a bias is fitted: without one, no second [T, k] float64 copy (Llama 8B's shape: 0.7 GB)
    zc, yc = (z - mz, y - my) if has_bias else (z, y)
    del z
    gram = zc.T @ zc  # [k, k]
    lam = ridge * gram.diagonal().mean()
    rhs = zc.T @ yc  # [k, h]
    del zc
    if toward == "compressed":
        rhs = rhs + lam * (_dense(c) if isinstance(c, LowRankMLP) else c.weights).down.double().T
    gram.diagonal().add_(lam)  # + lam I in place: no [k, k] identity and sum beside the Gram matrix (2 x 0.9 GB at k = 10752)
    w = torch.linalg.solve(gram, rhs).T  # [h, k]
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
    return new
