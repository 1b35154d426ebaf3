"""Projection modules of any kind (nn.Linear, Conv1D, ScaledLinear, LowRankLinear): shapes, weights, builders."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from src.models.replacements import LowRankLinear, ScaledLinear


def shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a projection of any kind."""
    if isinstance(m, Conv1D):
        return m.weight.shape[1], m.weight.shape[0]
    return m.out_features, m.in_features


def bias(m: nn.Module) -> Tensor | None:
    return (m.left if isinstance(m, LowRankLinear) else m).bias


def effective_weight(m: nn.Module) -> Tensor:
    """The [out, in] matrix a projection applies, whatever its kind."""
    if isinstance(m, Conv1D):
        return m.weight.T  # Conv1D stores [in, out]
    if isinstance(m, nn.Linear):
        return m.weight
    if isinstance(m, ScaledLinear):
        return m.weight * m.scale[None, :]
    if isinstance(m, LowRankLinear):
        return m.left.weight @ m.right.weight  # [out, r] @ [r, in]
    raise TypeError(f"unknown projection module {type(m).__name__}")


def device_dtype(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(m.parameters())
    return p.device, p.dtype


@torch.no_grad()
def copy_dense(m: nn.Module, weight: Tensor, b: Tensor | None) -> None:
    """Copy ``weight`` [out, in] (and ``b``) into an existing same-shape nn.Linear or Conv1D."""
    if not isinstance(m, (nn.Linear, Conv1D)):
        raise ValueError(f"cannot write dense weights into a {type(m).__name__}; write a FusedMLP or LowRankMLP")
    target = m.weight.T if isinstance(m, Conv1D) else m.weight  # a view: copy_ writes through
    if target.shape != weight.shape or (m.bias is None) != (b is None):
        raise ValueError(f"dense write-back needs the same shape and biases: {tuple(weight.shape)} into "
                         f"{tuple(target.shape)}; write a FusedMLP to change the width")
    target.copy_(weight)
    if b is not None:
        m.bias.copy_(b)


@torch.no_grad()
def linear(weight: Tensor, b: Tensor | None, scale: Tensor | None = None) -> nn.Module:
    """nn.Linear (or ScaledLinear when ``scale`` is given) holding ``weight`` [out, in]."""
    out_f, in_f = weight.shape
    m = nn.Linear(in_f, out_f, bias=b is not None) if scale is None else ScaledLinear(in_f, out_f, b is not None, scale)
    m.weight.copy_(weight)
    if b is not None:
        m.bias.copy_(b)
    return m


@torch.no_grad()
def lowrank(left: Tensor, right: Tensor, b: Tensor | None) -> LowRankLinear:
    """LowRankLinear computing ``left @ right`` ([out, r] @ [r, in]) plus ``b``."""
    assert left.shape[1] == right.shape[0], f"left {tuple(left.shape)} @ right {tuple(right.shape)}"
    m = LowRankLinear(right.shape[1], left.shape[0], right.shape[0], bias=b is not None)
    m.left.weight.copy_(left)
    m.right.weight.copy_(right)
    if b is not None:
        m.left.bias.copy_(b)
    return m


def empty(kind: str, out_f: int, in_f: int, has_bias: bool, *, rank: int | None = None, scaled: bool = False,
          conv1d: bool = False) -> nn.Module:
    """A zero-initialised projection of a recorded structure (``layer_spec``), for ``load_state_dict``."""
    if kind == "lowrank":
        m = LowRankLinear(in_f, out_f, rank, has_bias)
    elif kind == "dense" and conv1d:
        assert has_bias, "Conv1D always has a bias"
        m = Conv1D(out_f, in_f)
    elif scaled:
        m = ScaledLinear(in_f, out_f, has_bias, torch.zeros(in_f))
    else:
        m = nn.Linear(in_f, out_f, bias=has_bias)
    for t in (*m.parameters(), *m.buffers()):
        t.data.zero_()
    return m
