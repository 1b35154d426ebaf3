"""The layer-level functions the rest of the project calls: read, write, record and rebuild one
layer's MLP (or a sparse block's parts), and what the metrics, calibration and export need of it.

Everything else sees ``src.methods.types`` containers in the ``nn.Linear`` layout ``[out, in]``.
Compressed layers keep the Hugging Face module tree with only the projection modules swapped, so
the stock forward still runs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PretrainedConfig, PreTrainedModel

from src.methods.types import Compressed, MLPWeights
from src.models.replacements import ExpertScale, ScaledLinear

from .dense import DenseMLP
from .discovery import AnyLayer, config_of, dense_width, family_of, find_mlp_layers, stacks
from .experts import FusedExperts, MoEBlock
from .spec import LayerSpec, MLPSpec, MoESpec


def layer(model: nn.Module, index: int) -> AnyLayer:
    layers = find_mlp_layers(model)
    if not 0 <= index < len(layers):
        raise IndexError(f"layer {index} out of range: {type(model).__name__} has {len(layers)} MLP layers")
    return layers[index]


def _block(model: nn.Module, index: int) -> MoEBlock:
    mlp = layer(model, index)
    if not isinstance(mlp, MoEBlock):
        raise ValueError(f"layer {index} of {type(model).__name__} has no experts (a dense MLP)")
    return mlp


def num_layers(model: nn.Module) -> int:
    """Number of transformer MLPs in the model."""
    return len(find_mlp_layers(model))


def is_sparse(model: nn.Module, index: int) -> bool:
    """Whether the layer's MLP is a Mixture-of-Experts block."""
    return isinstance(layer(model, index), MoEBlock)


def in_decoder(model: nn.Module, index: int) -> bool:
    """Whether the layer is a decoder block of an encoder-decoder model (its tokens are the decoder's)."""
    config = config_of(model)
    return getattr(config, "is_encoder_decoder", False) and index >= config.num_layers


def vmappable(model: nn.Module) -> bool:
    """Whether per-sample gradients of the model batch under ``torch.func.vmap`` (not Switch Transformers', whose
    experts dispatch tokens by data-dependent indexing and whose router reassigns its classifier in every forward)."""
    return family_of(config_of(model)).vmappable


def mlp_parts(model: nn.Module, index: int, experts: Sequence[int] | str = "all", shared_expert: bool = True) -> list[str | None]:
    """What to compress in a layer: ``[None]`` (the MLP itself) for a dense layer; for a sparse block the
    chosen routed experts (``"0"``, ...; ``experts="all"`` or ids) and, where it has one and ``shared_expert``, ``"shared"``."""
    mlp = layer(model, index)
    return mlp.parts(experts, shared_expert) if isinstance(mlp, MoEBlock) else [None]


def routed_tokens(model: nn.Module, index: int, x: Tensor) -> dict[str, Tensor]:
    """Which of a sparse block's input tokens x [T, h] each part sees, as masks [T] bool."""
    return _block(model, index).routed_tokens(x)


def router_counts(model: nn.Module, index: int, x: Tensor) -> Tensor:
    """How many of the tokens x [N, h] the block's router sends to each expert, [E]."""
    return _block(model, index).router_counts(x)


def mlp_modules(model: nn.Module, index: int) -> dict[str, nn.Module]:
    """The layer's projection modules ("gate", "up", "down", or "gate_up", "down"); a sparse block: its
    experts module ("experts") and the shared expert's ("shared_gate", ...)."""
    return layer(model, index).modules()


def mlp_param_names(model: nn.Module, index: int) -> list[str]:
    """Full names (as in ``model.named_parameters()``) of the layer's MLP projection parameters (a sparse
    block: every routed expert's and the shared expert's; never the router's or a shared-expert gate's)."""
    return layer(model, index).param_names()


def mlp_input_module(model: nn.Module, index: int) -> nn.Module:
    """The module whose first positional input is the MLP's input hidden states (for a forward pre-hook)."""
    mlp = layer(model, index)
    return mlp.root if isinstance(mlp, MoEBlock) else mlp.input_module()


def block_module(model: nn.Module, index: int) -> nn.Module | None:
    """The transformer block holding the layer's MLP, the outermost ``ModuleList`` element on its path
    (``model.layers.3``, ``bert.encoder.layer.3``), for a model whose blocks form one chain; None for an
    encoder-decoder model (its decoder blocks also read the encoder's output)."""
    if len(stacks(config_of(model))) > 1:
        return None
    path = layer(model, index).path.split(".")
    for j in range(1, len(path)):
        if path[j].isdigit() and isinstance(parent := model.get_submodule(".".join(path[:j])), nn.ModuleList):
            return parent[int(path[j])]
    return None


def mlp_forward(model: nn.Module, index: int, x: Tensor) -> Tensor:
    """The layer's MLP on hidden states ``x`` [..., h] -> [..., h]: no dropout, residual or norm (a sparse
    block: router, experts and shared expert, as the block computes them)."""
    return layer(model, index).forward(x)


def intermediate_sizes(model: nn.Module) -> list[int]:
    """The current intermediate size (width) of every MLP layer (a sparse block: its experts')."""
    return [mlp.width for mlp in find_mlp_layers(model)]


def read_mlp(model: nn.Module, index: int, part: str | None = None) -> MLPWeights:
    """The layer's MLP in the [out, in] layout (copies), as the dense MLP it computes. In a sparse block
    ``part`` names a routed expert (``"0"``, ...) or ``"shared"``."""
    mlp = layer(model, index)
    if isinstance(mlp, MoEBlock):
        if part is None:
            raise ValueError(f"layer {index} is a Mixture-of-Experts block: name a part, one of {mlp.parts()}")
        return mlp.read(part)
    if part is not None:
        raise ValueError(f"layer {index} is a dense MLP: it has no part {part!r}")
    return mlp.read()


def write_mlp(model: nn.Module, index: int, compressed: MLPWeights | Compressed, part: str | None = None) -> None:
    """Write a layer's MLP (``DenseMLP.write``); in a sparse block ``part`` names the part (``write_parts`` writes several)."""
    mlp = layer(model, index)
    if isinstance(mlp, MoEBlock):
        if part is None:
            raise ValueError(f"layer {index} is a Mixture-of-Experts block: name a part, one of {mlp.parts()}")
        mlp.write({part: compressed})
    elif part is not None:
        raise ValueError(f"layer {index} is a dense MLP: it has no part {part!r}")
    else:
        mlp.write(compressed)


def write_parts(model: nn.Module, index: int, results: dict[str, MLPWeights | Compressed]) -> None:
    """Write several parts of a sparse block at once (``{"0": ..., "shared": ...}``; ``MoEBlock.write``)."""
    _block(model, index).write(results)


def layer_spec(model: nn.Module, index: int) -> LayerSpec:
    """The layer's current MLP structure, e.g. ``MLPSpec("fused", 16, scaled=True, up_bias=True, down_bias=True)``;
    a sparse block's ``MoESpec(experts, shared)`` (``as_dict()`` gives it as plain data)."""
    mlp = layer(model, index)
    return mlp.spec() if isinstance(mlp, MoEBlock) else mlp.spec(dense_width(config_of(model)))


def build_from_spec(model: nn.Module, index: int, spec: LayerSpec) -> None:
    """Replace the layer's projections with zero-initialised modules of the structure ``spec`` (from
    ``layer_spec``, or a record read back by ``spec_from_dict``), ready for ``load_state_dict`` of a checkpoint."""
    mlp = layer(model, index)
    if isinstance(spec, MoESpec) != isinstance(mlp, MoEBlock):
        has, recorded = ("experts", "a dense MLP") if isinstance(mlp, MoEBlock) else ("no experts", "a Mixture-of-Experts block")
        raise ValueError(f"layer {index} has {has}, but its recorded structure is {recorded}")
    mlp.build(spec)


def reinit_mlp(model: nn.Module, index: int) -> None:
    """Re-initialise the layer's MLP weights like the model's default init: weights N(0, initializer_range)
    (GPT-2's down projection / sqrt(2 n_layer)), biases zero; a count scale is kept. A sparse block: its
    experts and shared expert, not the router."""
    mlp, cfg = layer(model, index), config_of(model)
    std = getattr(cfg, "initializer_range", 0.02)
    residual = isinstance(mlp, DenseMLP) and mlp.layout.residual_init
    for name, m in mlp.modules().items():
        s = std / math.sqrt(2 * cfg.num_hidden_layers) if name == "down" and residual else std
        # torch's init, not transformers.initialization: the latter skips params flagged _is_hf_initialized
        for pname, p in m.named_parameters():
            if pname.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, s)


def stock_widths(model: nn.Module) -> dict[str, int] | None:
    """{config attribute: width} when every layer is a plain stock MLP (no count scale, no factors) and each
    width attribute takes one value across layers: written into ``config.json``, the folder then loads with
    plain ``from_pretrained``. None otherwise (a shared expert whose width no attribute sets must keep it), and
    where the stock model of those widths lacks one of the model's parameters (a compensated down-projection
    bias in a bias-free Llama: ``mlp_bias`` would give every layer's gate, up and down one)."""
    config = config_of(model)
    fam = family_of(config)
    seen: dict[str, set[int]] = {}

    def add(attr: str | None, spec: MLPSpec, pretrained: int | None = None) -> bool:
        if attr is None:  # no attribute sets this width: only the pretrained one is stock
            return spec.kind == "dense" and spec.width == pretrained
        seen.setdefault(attr, set()).add(spec.width)
        return spec.kind != "lowrank" and not spec.scaled

    for i in range(num_layers(model)):
        spec = layer_spec(model, i)
        if isinstance(spec, MoESpec):
            ex = fam.experts
            plain = add(ex.width_attr, spec.experts) and (
                spec.shared is None or add(ex.shared_width_attr, spec.shared, ex.shared_width(config)))
        else:  # a dense model's MLP, or a dense block of a MoE model (Switch: its d_ff is the experts' too)
            plain = add(fam.width_attr, spec)
        if not plain:
            return None
    if not all(len(ws) == 1 for ws in seen.values()):
        return None
    widths = {attr: ws.pop() for attr, ws in seen.items()}
    return widths if _stock_params(model, widths) else None


def _stock_params(model: nn.Module, widths: dict[str, int]) -> bool:
    """Whether the stock model of ``widths`` (its skeleton, built on the meta device) has exactly the model's
    parameters, by name and shape: else ``from_pretrained`` would drop or invent weights."""
    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    config = copy.deepcopy(hf.config)
    set_config_widths(config, widths)
    with torch.device("meta"):
        stock = type(hf)(config)
    return {n: p.shape for n, p in stock.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}


def set_config_widths(config: PretrainedConfig, widths: dict[str, int]) -> None:
    """Write ``stock_widths``' result into a config (a stock model of those widths, for export)."""
    for attr, width in widths.items():
        setattr(config, attr, width)


def fused_expert_weights(model: nn.Module) -> list[str]:
    """Full names of every sparse block's fused 3-D expert weights ([E, out, in] or, transposed, [E, in, out]) that
    LoRA can adapt in place (``src.modules.lora``); a ModuleDict layout's experts are Linear modules instead."""
    return [name for mlp in find_mlp_layers(model) if isinstance(mlp, FusedExperts) for name in mlp.fused_weights()]


def fold_scales(model: nn.Module) -> int:
    """Fold every count scale into its down projection (same outputs; for export): ScaledLinear becomes
    nn.Linear, an experts module's ``ExpertScale`` is removed with ``down_proj`` left scaled. Returns how many."""
    scaled = [name for name, m in model.named_modules() if isinstance(m, ScaledLinear)]
    for name in scaled:
        model.set_submodule(name, model.get_submodule(name).fold())
    experts = [m for m in model.modules() if parametrize.is_parametrized(m, "down_proj")
               and isinstance(m.parametrizations.down_proj[0], ExpertScale)]
    for m in experts:
        parametrize.remove_parametrizations(m, "down_proj", leave_parametrized=True)
    return len(scaled) + len(experts)
