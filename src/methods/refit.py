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
from collections.abc import Iterator

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


def _held_tokens(calib: MLPCalibration) -> Tensor:
    """[T] bool: the tokens of every ``HOLDOUT_EVERY``-th calibration sequence (without lengths, blocks of 32 tokens)."""
    lengths = calib.lengths
    if lengths is None:
        lengths = torch.tensor([min(32, len(calib.x) - s) for s in range(0, len(calib.x), 32)])
    held = torch.arange(len(lengths)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1  # [S]
    return torch.repeat_interleave(held, lengths).to(calib.x.device)


CHUNK = 2048  # tokens upcast to float64 at a time: the design stays [T, k] in its compute dtype, not a float64 copy


def _chunks(z: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Token chunks of z [T, k] and y [T, h] in float64."""
    for s in range(0, len(z), CHUNK):
        yield z[s : s + CHUNK].double(), y[s : s + CHUNK].double()


@dataclasses.dataclass
class _Sums:
    """The token sums every ridge's solution is made of (float64): count, Σz [k], Σy [h], ZᵀZ [k, k], Zᵀy [k, h].
    Built once and shared by every ρ (held-out rows taken out for the fits, put back for the final one): the
    [k, k] product is a refit's cost (2 TFLOP at Llama 8B's k = 10752 on 8.6 k tokens), more than the solves."""

    n: int
    z: Tensor
    y: Tensor
    zz: Tensor
    zy: Tensor

    @classmethod
    def of(cls, z: Tensor, y: Tensor) -> _Sums:
        k, h, f64 = z.shape[1], y.shape[1], torch.float64
        s = cls(0, z.new_zeros(k, dtype=f64), z.new_zeros(h, dtype=f64), z.new_zeros(k, k, dtype=f64), z.new_zeros(k, h, dtype=f64))
        s.add_(z, y)
        return s

    def add_(self, z: Tensor, y: Tensor, sign: int = 1) -> None:
        """Adds (``sign=-1``: removes) the rows z [t, k], y [t, h] in place: no second [k, k] matrix."""
        self.n += sign * len(z)
        for zc, yc in _chunks(z, y):
            self.z.add_(zc.sum(0), alpha=sign)
            self.y.add_(yc.sum(0), alpha=sign)
            self.zz.addmm_(zc.T, zc, alpha=sign)
            self.zy.addmm_(zc.T, yc, alpha=sign)


def _down(c: Compressed) -> tuple[Tensor, Tensor | None]:
    """The down matrix ``c`` applies [h, k] and its bias [h] (None without one)."""
    if isinstance(c, LowRankMLP):
        return _dense(c).down, c.down_bias
    return c.weights.down, c.weights.down_bias


def _error(c: Compressed, z: Tensor, y: Tensor) -> float:
    """‖z downᵀ + b − y‖_F / ‖y‖_F in float64 for the design z [T, k] and outputs y [T, h]: ``rel_error`` without
    recomputing the activations, which a refit does not change."""
    down, bias = _down(c)
    down = down.double().T  # [k, h]
    miss = norm = 0.0
    for zc, yc in _chunks(z, y):
        out = zc @ down
        if bias is not None:
            out += bias.double()
        miss += (out - yc).square().sum().item()
        norm += yc.square().sum().item()
    return (miss / norm) ** 0.5


def _solve(c: Compressed, s: _Sums, ridge: float, toward: str = "zero") -> Compressed:
    """The ridge solution for ``c``'s down projection (and bias) from the sums ``s``, whatever its error: the penalty
    λ‖W − W0‖², W0 = 0 or (``toward="compressed"``) the down projection ``c`` has, [h, k]."""
    has_bias = _down(c)[1] is not None
    # rhs in column-major order [k, h] (LAPACK's), so that the triangular solves below overwrite it in place
    a, rhs = s.zz.clone(), s.zy.mT.contiguous().mT
    if has_bias:  # centred: ZcᵀZc = ZᵀZ − n m mᵀ, Zcᵀyc = Zᵀy − n m_z m_yᵀ
        mz, my = s.z / s.n, s.y / s.n
        a.addr_(mz, mz, alpha=-s.n)
        rhs.addr_(mz, my, alpha=-s.n)
    lam = (ridge * a.diagonal().mean()).item()
    if toward == "compressed":  # + λ W0ᵀ, a chunk of W0's rows at a time: no [k, h] float64 copy of it
        w0 = _down(c)[0]  # [h, k]
        for i in range(0, len(w0), CHUNK):
            rhs[:, i : i + CHUNK].add_(w0[i : i + CHUNK].T.double(), alpha=lam)
    a.diagonal().add_(lam)  # + λI in place: no [k, k] identity beside the Gram matrix (0.9 GB at k = 10752)
    # Cholesky A = L Lᵀ (A is symmetric positive definite for λ > 0: half LU's cost), then L Lᵀ X = rhs, all in place:
    # a.mT is a column-major view of the same matrix, so neither the factor nor the solution is a new [k, k] or [k, h]
    low = torch.linalg.cholesky(a.mT, out=a.mT)
    torch.linalg.solve_triangular(low, rhs, upper=False, out=rhs)
    torch.linalg.solve_triangular(low.mT, rhs, upper=True, out=rhs)
    w = rhs.T  # [h, k]
    del a, low
    if isinstance(c, LowRankMLP):
        left, right = c.factors["down"]
        l64 = left.double()
        new_right = torch.linalg.solve(l64.T @ l64, l64.T @ w)  # [r, d]
        w = l64 @ new_right  # the down matrix the factors now apply, [h, d]: the bias goes with it
    b = (my - w @ mz) if has_bias else None
    if isinstance(c, LowRankMLP):
        factors = {**c.factors, "down": (left, new_right.to(right.dtype))}
        return dataclasses.replace(c, factors=factors, down_bias=None if b is None else b.to(left.dtype))
    dtype = c.weights.down.dtype
    return dataclasses.replace(c, weights=dataclasses.replace(c.weights, down=w.to(dtype).contiguous(), down_bias=None if b is None else b.to(dtype)))


def choose_ridge(c: Compressed, calib: MLPCalibration, toward: str = "zero") -> tuple[float, dict[float, float]]:
    """The ρ of ``RIDGES`` with the lowest error on held-out calibration sequences, and each ρ's error."""
    return _choose(c, design(c, calib.x), calib.y, _held_tokens(calib), toward)[:2]


def _choose(c: Compressed, z: Tensor, y: Tensor, held: Tensor, toward: str) -> tuple[float, dict[float, float], _Sums | None]:
    """``choose_ridge`` on the design z [T, k] and outputs y [T, h], with the held-out rows ``held`` [T]; also the
    sums of all tokens (None when either side is empty)."""
    if held.all() or not held.any():
        return 1e-3, {}, None
    zh, yh = z[held], y[held]  # [t, k], [t, h]: a fifth of the tokens, the only rows copied
    s = _Sums.of(z, y)
    s.add_(zh, yh, sign=-1)  # the fitted rows' sums: all tokens' less the held-out ones
    errors = {rho: _error(_solve(c, s, rho, toward), zh, yh) for rho in RIDGES}
    s.add_(zh, yh)
    return min(errors, key=errors.get), errors, s


@torch.no_grad()
def refit(c: Compressed, calib: MLPCalibration, ridge: float | str = 1e-3, toward: str = "zero") -> Compressed:
    """``c`` with its down projection (and bias) re-fitted to the calibration outputs; see the module doc.
    ``toward="compressed"`` shrinks the fit toward ``c``'s own down projection instead of toward zero."""
    z, y = design(c, calib.x), calib.y  # [T, k], [T, h] in the compute dtype: the activations are computed once
    s = None
    if ridge == "auto":
        rho, _, s = _choose(c, z, y, _held_tokens(calib), toward)
    else:
        rho = float(ridge)
    new = _solve(c, s if s is not None else _Sums.of(z, y), rho, toward)
    before, after = _error(c, z, y), _error(new, z, y)
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
