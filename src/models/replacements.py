"""Drop-in replacements for a Hugging Face MLP's projections after compression (ScaledLinear, LowRankLinear) and the
parametrizations of a fused experts module's 3-D weights (ExpertScale, ExpertLowRank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ScaledLinear(nn.Module):
    """``F.linear(x, W · diag(scale), b)`` (= ``F.linear(x * scale, W, b)``) with a frozen per-input scale.

    ``scale`` [in] holds MLP fusion's k-means cluster counts: a persistent buffer (saved in
    checkpoints, moved by ``.to``) that the optimizer never sees. Deliberately not an ``nn.Linear``
    subclass, so that no code mistakes it for a plain Linear and silently drops the scale.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scale: Tensor) -> None:
        super().__init__()
        assert scale.shape == (in_features,), f"scale {tuple(scale.shape)} != {(in_features,)}"
        lin = nn.Linear(in_features, out_features, bias=bias, device=scale.device)  # reuse Linear's init
        self.in_features, self.out_features = in_features, out_features
        self.weight = lin.weight  # [out, in]
        self.bias = lin.bias  # [out] or None
        self.register_buffer("scale", scale.detach().clone().to(self.weight.dtype), persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        # scale the weight [out, in], not the activations [tokens, in]: the same outputs and gradients
        # (∂L/∂W = ∂L/∂W_eff · diag(scale)) for out·in multiplications instead of tokens·in, and no
        # float32 copy of the bf16 activations under autocast (x * a float32 buffer promotes)
        return F.linear(x, self.weight * self.scale, self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function: ``W · diag(scale)`` (inference/export only)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight * self.scale[None, :])
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LowRankLinear(nn.Module):
    """``left(right(x))``: a rank-r factorisation ``W ≈ left.weight @ right.weight`` ([out, r] @ [r, in])."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        assert rank > 0, f"rank {rank}"
        self.right = nn.Linear(in_features, rank, bias=False)
        self.left = nn.Linear(rank, out_features, bias=bias)

    @property
    def in_features(self) -> int:
        return self.right.in_features

    @property
    def out_features(self) -> int:
        return self.left.out_features

    @property
    def rank(self) -> int:
        return self.right.out_features

    @property
    def weight(self) -> Tensor:
        """The [out, in] matrix it applies: T5's MLP reads ``wo.weight`` (for its dtype) in every forward."""
        return self.left.weight @ self.right.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.left(self.right(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def expert_native(t: Tensor, transposed: bool, interleaved: bool) -> Tensor:
    """A fused experts' tensor from the canonical [E, out, ...] form (gate_up: the gate rows, then the up
    rows) to the module's own: rows interleaved (gate_0, up_0, gate_1, ...) and/or transposed to
    [E, in, out] (gpt-oss). Biases [E, out] are interleaved, never transposed."""
    if interleaved:
        E, n = t.shape[:2]
        t = t.reshape(E, 2, n // 2, -1).transpose(1, 2).reshape(t.shape)
    return t.transpose(1, 2) if transposed and t.ndim == 3 else t


def expert_canonical(t: Tensor, transposed: bool, interleaved: bool) -> Tensor:
    """The inverse of ``expert_native``: the module's tensor in the canonical [E, out, ...] form."""
    t = t.transpose(1, 2) if transposed and t.ndim == 3 else t
    if interleaved:
        E, n = t.shape[:2]
        t = t.reshape(E, n // 2, 2, -1).transpose(1, 2).reshape(t.shape)
    return t


class ExpertScale(nn.Module):
    """Parametrization of fused experts' ``down_proj`` [E, h, k] ([E, k, h] transposed): ``W_e · diag(scale_e)``
    for every expert e.

    ``scale`` [E, k] holds each expert's frozen k-means counts (MLP fusion; 1 for unscaled neurons, 0
    for the padding of an expert narrower than the layer's width). Scaling the down projection's
    weight gives the same outputs and the same gradients as scaling the activations
    (∂L/∂W = ∂L/∂W_eff ⊙ scale, like ``ScaledLinear``), and keeps the stock experts forward, so
    every transformers experts implementation (eager, batched_mm, grouped_mm) still runs.
    """

    def __init__(self, scale: Tensor, transposed: bool = False) -> None:
        super().__init__()
        assert scale.ndim == 2, f"scale must be [E, k], got {tuple(scale.shape)}"
        self.register_buffer("scale", scale.detach().clone(), persistent=True)
        self.transposed = transposed

    def forward(self, weight: Tensor) -> Tensor:
        s = self.scale.to(weight.dtype)
        return weight * (s[:, :, None] if self.transposed else s[:, None, :])  # [E, k, h] * [E, k, 1] or [E, h, k] * [E, 1, k]


class ExpertLowRank(nn.Module):
    """Parametrization of a fused experts' weight as per-expert factor products, stacked along dim 1:
    ``cat_j(left_j @ right_j)`` with left_j [E, out_j, r] and right_j [E, r, in] (gate_up = [gate; up]),
    then in the module's own layout (``expert_native``).

    The factors become the trainable originals (``original0``, ``original1``, ...); ``factors`` only
    seeds them when the parametrization is registered.
    """

    def __init__(self, factors: list[tuple[Tensor, Tensor]], transposed: bool = False, interleaved: bool = False) -> None:
        super().__init__()
        self._seed = [t for pair in factors for t in pair]
        self.transposed, self.interleaved = transposed, interleaved

    def forward(self, *factors: Tensor) -> Tensor:
        w = torch.cat([torch.bmm(left, right) for left, right in zip(factors[::2], factors[1::2])], dim=1)
        return expert_native(w, self.transposed, self.interleaved)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        seed, self._seed = self._seed, []
        return tuple(t.to(device=weight.device, dtype=weight.dtype) for t in seed)
