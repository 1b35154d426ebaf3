"""Helpers shared by the compression methods: sub-MLP points and back, importance, validation."""

from __future__ import annotations

import re

import torch
from torch import Tensor
from transformers.activations import ACT2FN

from .types import FusedMLP, MLPWeights


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half and bfloat16 inputs (k-means, SVD and sketches need the mantissa)."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def check_mid_dim(w: MLPWeights, mid_dim: int) -> None:
    """Refuse a width outside [1, d]; d itself is allowed here (exactness checks use it)."""
    if isinstance(mid_dim, bool) or not isinstance(mid_dim, int) or not 1 <= mid_dim <= w.width:
        raise ValueError(f"mid_dim must be an int in [1, {w.width}], got {mid_dim!r}")


def _segments(w: MLPWeights) -> list[tuple[str, int]]:
    """The columns of a sub-MLP point, in order: (field, width); a field absent from ``w`` is left out."""
    h = w.hidden_size
    segs = [("gate", h), ("gate_bias", 1), ("up", h), ("up_bias", 1), ("down", h)]
    return [(name, n) for name, n in segs if getattr(w, name) is not None]


def sub_mlp_points(w: MLPWeights) -> Tensor:
    """One row per sub-MLP: c_i = [gate[i, :]?, gate_bias[i]?, up[i, :], up_bias[i]?, down[:, i]], [d, P].

    P = 2h + 1 with biases, 2h without, 3h gated (3h + 2 with gpt-oss's biases); in the compute dtype,
    never aliasing ``w``.
    """
    cols = {"gate": w.gate, "up": w.up, "down": w.down.T, "gate_bias": w.gate_bias, "up_bias": w.up_bias}
    dtype = compute_dtype(w.up)
    return torch.cat([cols[name].reshape(w.width, -1).to(dtype) for name, _ in _segments(w)], 1)


def mlp_from_points(points: Tensor, like: MLPWeights, fold: Tensor | None = None) -> MLPWeights:
    """Split points [k, P] back into a width-k MLP shaped, typed and activated like ``like``.

    ``fold`` [k] multiplies each new neuron: up row, up bias and down column of a plain MLP; gate
    row, gate bias and down column of a gated one (up stays as is, so with ReLU, where
    act(s·z) = s·act(z), folding √n equals the frozen scale n exactly). ``down_bias`` is copied unchanged.
    """
    segs = _segments(like)
    assert points.shape[1] == sum(n for _, n in segs), f"points {tuple(points.shape)} do not match {segs}"
    folded = {"gate", "gate_bias", "down"} if like.is_gated else {"up", "up_bias", "down"}
    parts, start = {}, 0
    for name, n in segs:
        t = points[:, start : start + n]  # [k, n]
        start += n
        if fold is not None and name in folded:
            t = t * fold.to(t.dtype)[:, None]
        t = t[:, 0] if n == 1 else t.T if name == "down" else t  # bias [k]; down [h, k]
        parts[name] = t.to(like.up.dtype).contiguous()
    down_bias = None if like.down_bias is None else like.down_bias.clone()
    return MLPWeights(**parts, down_bias=down_bias, activation=like.activation)


def importance(w: MLPWeights) -> Tensor:
    """Magnitude of each sub-MLP [d]: ‖up_i‖·‖down_i‖, times ‖gate_i‖ for gated MLPs.

    Biases are left out, as in the paper's ‖W1[i,:]‖·‖W2[:,i]‖; a gated neuron is the product of
    its three vectors, so its norm product is the natural extension.
    """
    dtype = compute_dtype(w.up)
    score = w.up.to(dtype).norm(dim=1) * w.down.to(dtype).norm(dim=0)
    return score if w.gate is None else score * w.gate.to(dtype).norm(dim=1)


def top_sub_mlps(w: MLPWeights, t: int, score: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Indices of the ``t`` sub-MLPs of largest ``score`` [d] (default: ``importance``) and of the
    others, each in original order."""
    order = (importance(w) if score is None else score).argsort(descending=True, stable=True)  # stable: ties break by index
    return order[:t].sort().values, order[t:].sort().values


def keep_top(w: MLPWeights, mid_dim: int, score: Tensor) -> FusedMLP:
    """The MLP of the ``mid_dim`` neurons of largest ``score`` [d], in original order: what the calibrated
    pruning methods return once they have scored the neurons."""
    keep, _ = top_sub_mlps(w, mid_dim, score)
    return FusedMLP(mlp_from_points(sub_mlp_points(w)[keep], w), stats={"kept_score_frac": (score[keep].sum() / score.sum()).item()})


# gpt-oss's gated form: (clamp(u, ±L) + 1) · c · σ(α c), c = clamp(g, max=L)
CLAMPED_SWIGLU = re.compile(r"clamped_swiglu\(alpha=(?P<alpha>[-+.eE\d]+),limit=(?P<limit>[-+.eE\d]+)\)")


def clamped_swiglu(alpha: float, limit: float) -> str:
    """The activation name of gpt-oss's clamped SwiGLU with its two constants (config.swiglu_alpha, swiglu_limit)."""
    return f"clamped_swiglu(alpha={alpha},limit={limit})"


def gated_form(activation: str, g: Tensor, u: Tensor) -> Tensor:
    """A gated neuron's output from its gate and up pre-activations: act(g) · u, or gpt-oss's clamped form."""
    m = CLAMPED_SWIGLU.fullmatch(activation)
    if m is None:
        return ACT2FN[activation](g) * u
    alpha, limit = float(m["alpha"]), float(m["limit"])
    g = g.clamp(max=limit)
    return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)


def activations(w: MLPWeights, x: Tensor) -> Tensor:
    """Each neuron's activation on inputs x [T, h] -> [T, d]: act(up x + b), or the gated form of
    (gate x + b_g, up x + b_u) gated; in the compute dtype."""
    dtype = compute_dtype(w.up)
    x = x.to(dtype)

    def pre(m: Tensor, b: Tensor | None) -> Tensor:
        return x @ m.to(dtype).T + (0 if b is None else b.to(dtype))

    up = pre(w.up, w.up_bias)
    return gated_form(w.activation, pre(w.gate, w.gate_bias), up) if w.is_gated else ACT2FN[w.activation](up)
