"""Helpers shared by the compression methods: sub-MLP points and back, importance, validation."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.activations import ACT2FN

from .types import MLPWeights


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half and bfloat16 inputs (k-means, SVD and sketches need the mantissa)."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def check_mid_dim(w: MLPWeights, mid_dim: int) -> None:
    """Refuse a width outside [1, d]; d itself is allowed here (exactness checks use it)."""
    if isinstance(mid_dim, bool) or not isinstance(mid_dim, int) or not 1 <= mid_dim <= w.width:
        raise ValueError(f"mid_dim must be an int in [1, {w.width}], got {mid_dim!r}")


def sub_mlp_points(w: MLPWeights) -> Tensor:
    """One row per sub-MLP: c_i = [gate[i, :]?, up[i, :], up_bias[i]?, down[:, i]], [d, P].

    P = 2h + 1 with biases, 2h without, 3h gated; in the compute dtype, never aliasing ``w``.
    """
    parts = [w.gate, w.up, None if w.up_bias is None else w.up_bias[:, None], w.down.T]
    dtype = compute_dtype(w.up)
    return torch.cat([p.to(dtype) for p in parts if p is not None], 1)


def mlp_from_points(points: Tensor, like: MLPWeights, fold: Tensor | None = None) -> MLPWeights:
    """Split points [k, P] back into a width-k MLP shaped, typed and activated like ``like``.

    ``fold`` [k] multiplies each new neuron: up row, up bias and down column of a plain MLP; gate
    row and down column of a gated one (up stays as is, so with ReLU, where act(s·z) = s·act(z),
    folding √n equals the frozen scale n exactly). ``down_bias`` is copied unchanged.
    """
    h, dtype = like.hidden_size, like.up.dtype
    if fold is not None:
        f = fold.to(points.dtype)[:, None].expand(-1, points.shape[1]).clone()  # [k, P]
        if like.is_gated:
            f[:, h : 2 * h] = 1
        points = points * f
    gate, rest = (points[:, :h], points[:, h:]) if like.is_gated else (None, points)
    up, rest = rest[:, :h], rest[:, h:]
    up_bias = rest[:, 0] if like.up_bias is not None else None
    down = rest[:, -h:].T  # [h, k]

    def out(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    return MLPWeights(
        up=out(up),
        down=out(down),
        up_bias=out(up_bias),
        down_bias=None if like.down_bias is None else like.down_bias.clone(),
        gate=out(gate),
        activation=like.activation,
    )


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


def activations(w: MLPWeights, x: Tensor) -> Tensor:
    """Each neuron's activation on inputs x [T, h] -> [T, d]: act(up x + b), or act(gate x) * (up x)
    gated; in the compute dtype."""
    dtype = compute_dtype(w.up)
    x, act = x.to(dtype), ACT2FN[w.activation]
    pre = x @ w.up.to(dtype).T + (0 if w.up_bias is None else w.up_bias.to(dtype))
    return act(x @ w.gate.to(dtype).T) * pre if w.is_gated else act(pre)
