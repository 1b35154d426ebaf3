"""AdamW with the paper's parameter groups, its implementation chosen for the precision, and the schedule.

One place for what ``FineTuneModule`` and the benchmarks' bare training steps share.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup, get_polynomial_decay_schedule_with_warmup

# precisions whose Lightning plugin keeps a GradScaler (fp16 autocast): it unscales the gradients before
# clipping them, which an optimizer that unscales inside its own step (fused) does not allow
SCALED = ("16-mixed", "16")
FSDP_PREFIX = "_fsdp_wrapped_module."  # what FSDP inserts into the names of the parameters it wraps
SCHEDULES = ("linear", "polynomial")  # optim.schedule: how the learning rate decays to 0 after the warm-up


def implementation(precision: str) -> dict[str, bool]:
    """``fused=True`` (one kernel per parameter group: no multi-tensor temporaries as large as all the
    parameters, ~0.5 GB a step on SmolLM2 with foreach, and the fastest step on CUDA) wherever the
    precision allows it; under fp16's loss scaling the multi-tensor (``foreach``) step, with which
    Lightning unscales and clips."""
    return {"foreach": True} if str(precision) in SCALED else {"fused": True}


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 ndim: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """No weight decay on biases and norms (parameters of fewer than two dimensions, or named norm), as in
    the paper's (and every BERT) recipe. ``ndim``: each parameter's dimensions recorded before FSDP
    flattened it into 1-D shards (names without FSDP's wrapper prefix)."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            dims = (ndim or {}).get(name.replace(FSDP_PREFIX, ""), p.ndim)
            (no_decay if dims < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(named: Iterable[tuple[str, nn.Parameter]], optim: dict[str, Any], precision: str,
                ndim: dict[str, int] | None = None) -> torch.optim.AdamW:
    """AdamW over ``named`` parameters with ``optim``'s settings (``conf/optim/adamw.yaml``)."""
    return torch.optim.AdamW(param_groups(named, optim["weight_decay"], ndim), lr=optim["lr"], betas=tuple(optim["betas"]),
                             eps=optim["eps"], **implementation(precision))


def build_schedule(opt: torch.optim.Optimizer, optim: dict[str, Any], total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear (or polynomial) decay to 0."""
    warmup = int(optim["warmup_ratio"] * total_steps)
    if optim["schedule"] == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(opt, warmup, total_steps, power=optim["power"])
    return get_linear_schedule_with_warmup(opt, warmup, total_steps)
