"""LoRA recovery after compression (``finetune=lora``), with peft's LoRA layers injected in place.

The model keeps its own module tree (a projection becomes peft's ``lora.Linear`` around it), so the
task modules, checkpoints and ``mlp_io`` see the same model. Before the adapters go in, count scales
are folded into the down projections: the same function, and with the base weights frozen the frozen
count scale changes nothing that trains. A low-rank (``svd``) projection gets adapters on both its
factors. A MoE block's fused 3-D expert weights get peft's ``ParamWrapper`` (``target_parameters``): rank r per
expert, without dropout, which peft cannot apply to a weight update. Narrower experts zero-padded to the fused
width (a subset compressed) can grow into their padding this way, at no extra storage or compute: the padding
costs both already. ``merge`` folds the adapters back into plain weights (``src.export``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from src.models import mlp_io
from src.models.replacements import LowRankLinear

log = logging.getLogger(__name__)


def targets(model: nn.Module, names: list[str]) -> list[str]:
    """Full names of the nn.Linear (or GPT-2 Conv1D) modules whose last name part is one of ``names`` (a LowRankLinear's
    two factors)."""
    found = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] not in names:
            continue
        if isinstance(m, LowRankLinear):
            found += [f"{name}.right", f"{name}.left"]
        elif type(m) in (nn.Linear, Conv1D):  # not a ScaledLinear: add_lora folds those first
            found.append(name)
    return found


def add_lora(model: PreTrainedModel, cfg: Mapping[str, Any]) -> None:
    """Fold count scales, inject LoRA adapters into ``cfg['target_modules']`` and freeze everything else but
    the head outside the transformer body (a classifier's new head; a causal LM's is tied to the frozen
    embeddings); logs the trainable count."""
    mlp_io.fold_scales(model)
    body = {id(p) for p in model.base_model.parameters()}
    head = {id(p) for p in model.parameters() if id(p) not in body}
    names = targets(model, list(cfg["target_modules"]))
    experts = mlp_io.fused_expert_weights(model) if cfg.get("experts") else []  # a checkpoint from before the option: none
    if not names and not experts:
        raise ValueError(f"finetune.target_modules={list(cfg['target_modules'])} names no Linear module of {type(model).__name__}")
    if names:
        conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in names)  # GPT-2 stores [in, out]
        inject_adapter_in_model(LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], target_modules=names,
                                           fan_in_fan_out=conv1d), model)
    if experts:
        with warnings.catch_warnings():  # a second injection (no dropout here) into the same model is what we mean
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_parameters=experts), model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or id(p) in head)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    fused = f" and {len(experts)} fused expert weights" if experts else ""
    log.info("LoRA rank %d on %d projections%s: %s trainable parameters of %s (%.2f %%)", cfg["rank"], len(names), fused,
             f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)


def merge(model: nn.Module) -> int:
    """Merge every LoRA adapter into its base weight and put the plain module back; returns how many."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in reversed(layers):  # innermost first: an experts module's two ParamWrappers nest (outer.base_layer)
        m.merge()
        model.set_submodule(name, m.get_base_layer())
    return len(layers)
