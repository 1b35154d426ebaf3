"""The one place that reads and writes each architecture's transformer MLPs.

Everything else sees ``src.compress.types`` containers in the ``nn.Linear`` layout ``[out, in]``.
A family is recognised by the module structure found in the model (no modeling code is copied or
forked); compressed layers keep the Hugging Face module tree (``intermediate.dense``,
``mlp.c_fc``, ``mlp.down_proj``...) with only the projection modules swapped, so the stock
forward still runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from src.compress.types import FusedMLP, LowRankMLP, MLPWeights
from src.models.layers import LowRankLinear, ScaledLinear


@dataclass(frozen=True)
class Family:
    """Where one MLP layout keeps its pieces; paths are relative to the MLP's root module."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values known to have this layout
    up: str
    down: str
    act: str  # the activation module
    input: str  # module whose first positional input is the MLP input ("" = the root itself)
    act_attr: str  # config attribute naming the activation (an ACT2FN key)
    width_attr: str  # config attribute holding the pretrained intermediate size
    gate: str | None = None
    conv1d: bool = False  # native projections are transformers Conv1D (weight [in, out])
    residual_init: bool = False  # down projection initialised with std / sqrt(2 n_layer) (GPT-2)

    def roles(self) -> dict[str, str]:
        """{role: path} for the projections: "gate" (gated only), "up", "down"."""
        return {r: p for r, p in (("gate", self.gate), ("up", self.up), ("down", self.down)) if p}


FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "electra", "camembert"), up="intermediate.dense",
           down="output.dense", act="intermediate.intermediate_act_fn", input="intermediate",
           act_attr="hidden_act", width_attr="intermediate_size"),
    Family("distilbert", ("distilbert",), up="lin1", down="lin2", act="activation", input="",
           act_attr="activation", width_attr="hidden_dim"),
    Family("gpt2", ("gpt2",), up="c_fc", down="c_proj", act="act", input="",
           act_attr="activation_function", width_attr="n_inner", conv1d=True, residual_init=True),
    Family("gated", ("llama", "mistral", "qwen2", "qwen3"), gate="gate_proj", up="up_proj",
           down="down_proj", act="act_fn", input="", act_attr="hidden_act", width_attr="intermediate_size"),
)
_SUPPORTED = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


@dataclass(frozen=True)
class MLPLayer:
    """One transformer block's MLP: its family, its root's name in the model and the root module."""

    family: Family
    path: str
    root: nn.Module

    def module(self, role: str) -> nn.Module:
        return self.root.get_submodule(self.family.roles()[role])

    def set_module(self, role: str, module: nn.Module) -> None:
        self.root.set_submodule(self.family.roles()[role], module)


# ---------------------------------------------------------------------------------------------
# discovery


def family_of(config: PretrainedConfig) -> Family:
    """The MLP family of a model from its config alone (before loading); ValueError if unsupported."""
    for fam in FAMILIES:
        if config.model_type in fam.model_types:
            return fam
    raise ValueError(f"model_type {config.model_type!r} is not supported; supported MLP families: {_SUPPORTED}")


def config_width(config: PretrainedConfig) -> int:
    """The pretrained MLP intermediate size a config describes (GPT-2: ``n_inner=None`` means 4h)."""
    return getattr(config, family_of(config).width_attr) or 4 * config.hidden_size


def mlp_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(number of transformer blocks, MLP intermediate size) from a config alone, before weights load."""
    return config.num_hidden_layers, config_width(config)


def mlp_param_count(config: PretrainedConfig) -> int:
    """Parameters of one pretrained MLP of a config: 3hd gated (no biases), else 2hd + d + h."""
    fam, h, d = family_of(config), config.hidden_size, config_width(config)
    return 3 * h * d if fam.gate else 2 * h * d + d + h


def set_config_width(config: PretrainedConfig, width: int) -> None:
    """Write a uniform MLP width into the config (a stock model of that width, for export)."""
    setattr(config, family_of(config).width_attr, width)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _config(model: nn.Module) -> PretrainedConfig:
    # the model itself or, for a wrapper (e.g. a LightningModule), the first Hugging Face model inside
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m.config
    raise ValueError(f"{type(model).__name__} contains no transformers PreTrainedModel")


def find_mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """The transformer blocks' MLPs in layer order; ValueError for an unsupported architecture."""
    found = {fam.name: [MLPLayer(fam, name, m) for name, m in model.named_modules()
                        if all(_has(m, p) for p in (*fam.roles().values(), fam.act))]
             for fam in FAMILIES}
    found = {k: v for k, v in found.items() if v}
    if len(found) != 1:
        what = "no known MLP layout" if not found else f"ambiguous MLP layouts {sorted(found)}"
        raise ValueError(f"unsupported architecture {type(model).__name__}: {what}; "
                         f"supported MLP families: {_SUPPORTED}")
    (layers,) = found.values()
    model_type = _config(model).model_type
    if model_type not in layers[0].family.model_types:
        raise ValueError(f"unsupported architecture {type(model).__name__} (model_type {model_type!r}) has a "
                         f"{layers[0].family.name}-like MLP but is untested; supported MLP families: {_SUPPORTED}")
    return layers


def _layer(model: nn.Module, layer: int) -> MLPLayer:
    layers = find_mlp_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range: {type(model).__name__} has {len(layers)} MLP layers")
    return layers[layer]


def num_layers(model: nn.Module) -> int:
    """Number of transformer MLPs in the model."""
    return len(find_mlp_layers(model))


def mlp_modules(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    """The layer's projection modules by role ("gate" when gated, "up", "down"), whatever their kind."""
    mlp = _layer(model, layer)
    return {role: mlp.module(role) for role in mlp.family.roles()}


def mlp_param_names(model: nn.Module, layer: int) -> list[str]:
    """Full names (as in ``model.named_parameters()``) of the layer's MLP projection parameters."""
    mlp = _layer(model, layer)
    prefix = f"{mlp.path}." if mlp.path else ""
    return [f"{prefix}{path}.{name}" for path in mlp.family.roles().values()
            for name, _ in mlp.root.get_submodule(path).named_parameters()]


def mlp_input_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose first positional input is the MLP's input hidden states (for a forward pre-hook)."""
    mlp = _layer(model, layer)
    return mlp.root.get_submodule(mlp.family.input)


def mlp_forward(model: nn.Module, layer: int, x: Tensor) -> Tensor:
    """The layer's MLP on hidden states ``x`` [..., h] -> [..., h]: no dropout, residual or norm."""
    mlp = _layer(model, layer)
    act = mlp.root.get_submodule(mlp.family.act)
    hid = act(mlp.module("gate")(x)) * mlp.module("up")(x) if mlp.family.gate else act(mlp.module("up")(x))
    return mlp.module("down")(hid)  # [..., k] -> [..., h]


def _activation(model: nn.Module, fam: Family) -> str:
    act = getattr(_config(model), fam.act_attr)
    if not isinstance(act, str):
        raise ValueError(f"config.{fam.act_attr} must name an activation (ACT2FN key), got {act!r}")
    return act


def _shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a projection of any kind."""
    if isinstance(m, Conv1D):
        return m.weight.shape[1], m.weight.shape[0]
    return m.out_features, m.in_features


def _bias(m: nn.Module) -> Tensor | None:
    return (m.left if isinstance(m, LowRankLinear) else m).bias


def intermediate_sizes(model: nn.Module) -> list[int]:
    """The current intermediate size (width) of every MLP layer."""
    return [_shape(mlp.module("up"))[0] for mlp in find_mlp_layers(model)]


# ---------------------------------------------------------------------------------------------
# read / write


def _effective_weight(m: nn.Module) -> Tensor:
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


@torch.no_grad()
def read_mlp(model: nn.Module, layer: int) -> MLPWeights:
    """The layer's MLP in the [out, in] layout (copies). A compressed layer reads as the dense MLP it
    computes: scales folded into ``down``, low-rank factors multiplied out."""
    mlp = _layer(model, layer)
    mods = mlp_modules(model, layer)
    if "gate" in mods and _bias(mods["gate"]) is not None:
        raise ValueError("gated MLPs with a gate bias (mlp_bias=True) are not supported")
    w = {role: _effective_weight(m).detach().clone() for role, m in mods.items()}
    b = {role: None if _bias(m) is None else _bias(m).detach().clone() for role, m in mods.items()}
    return MLPWeights(up=w["up"], down=w["down"], up_bias=b["up"], down_bias=b["down"], gate=w.get("gate"),
                      activation=_activation(model, mlp.family))


def _check_compatible(model: nn.Module, mlp: MLPLayer, activation: str, gated: bool, hidden: int) -> None:
    if activation != _activation(model, mlp.family):
        raise ValueError(f"activation {activation!r} != the model's {_activation(model, mlp.family)!r}")
    if gated != bool(mlp.family.gate):
        raise ValueError(f"a {'gated' if gated else 'non-gated'} MLP cannot go into a {mlp.family.name} model")
    if hidden != _shape(mlp.module("down"))[0]:
        raise ValueError(f"hidden size {hidden} != the model's {_shape(mlp.module('down'))[0]}")


def _device_dtype(m: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(m.parameters())
    return p.device, p.dtype


def _replace(mlp: MLPLayer, role: str, new: nn.Module) -> None:
    """Swap a projection, giving the new module the dtype and device of the one it replaces."""
    device, dtype = _device_dtype(mlp.module(role))
    mlp.set_module(role, new.to(device=device, dtype=dtype))


@torch.no_grad()
def _copy_dense(m: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    if not isinstance(m, (nn.Linear, Conv1D)):
        raise ValueError(f"cannot write dense weights into a {type(m).__name__}; write a FusedMLP or LowRankMLP")
    target = m.weight.T if isinstance(m, Conv1D) else m.weight  # a view: copy_ writes through
    if target.shape != weight.shape or (m.bias is None) != (bias is None):
        raise ValueError(f"dense write-back needs the same shape and biases: {tuple(weight.shape)} into "
                         f"{tuple(target.shape)}; write a FusedMLP to change the width")
    target.copy_(weight)
    if bias is not None:
        m.bias.copy_(bias)


@torch.no_grad()
def _linear(weight: Tensor, bias: Tensor | None, scale: Tensor | None = None) -> nn.Module:
    """nn.Linear (or ScaledLinear when ``scale`` is given) holding ``weight`` [out, in]."""
    out_f, in_f = weight.shape
    has_bias = bias is not None
    m = nn.Linear(in_f, out_f, bias=has_bias) if scale is None else ScaledLinear(in_f, out_f, has_bias, scale)
    m.weight.copy_(weight)
    if bias is not None:
        m.bias.copy_(bias)
    return m


@torch.no_grad()
def _lowrank(left: Tensor, right: Tensor, bias: Tensor | None) -> LowRankLinear:
    assert left.shape[1] == right.shape[0], f"left {tuple(left.shape)} @ right {tuple(right.shape)}"
    m = LowRankLinear(right.shape[1], left.shape[0], right.shape[0], bias=bias is not None)
    m.left.weight.copy_(left)
    m.right.weight.copy_(right)
    if bias is not None:
        m.left.bias.copy_(bias)
    return m


def write_mlp(model: nn.Module, layer: int, compressed: MLPWeights | FusedMLP | LowRankMLP) -> None:
    """Write a layer's MLP: ``MLPWeights`` are copied into the existing same-width modules; a
    ``FusedMLP`` replaces the projections with nn.Linear of width k (down: ScaledLinear when it has a
    scale); a ``LowRankMLP`` replaces each projection with a LowRankLinear."""
    mlp = _layer(model, layer)
    if isinstance(compressed, MLPWeights):
        w = compressed
        _check_compatible(model, mlp, w.activation, w.is_gated, w.hidden_size)
        biases = {"gate": None, "up": w.up_bias, "down": w.down_bias}
        for role, m in mlp_modules(model, layer).items():
            _copy_dense(m, getattr(w, role), biases[role])
    elif isinstance(compressed, FusedMLP):
        w = compressed.weights
        _check_compatible(model, mlp, w.activation, w.is_gated, w.hidden_size)
        assert compressed.scale is None or compressed.scale.shape == (w.width,), "scale must be [k]"
        new = {"up": _linear(w.up, w.up_bias), "down": _linear(w.down, w.down_bias, compressed.scale)}
        if w.is_gated:
            new["gate"] = _linear(w.gate, None)
        for role, m in new.items():
            _replace(mlp, role, m)
    elif isinstance(compressed, LowRankMLP):
        f = compressed
        _check_compatible(model, mlp, f.activation, "gate" in f.factors, f.factors["down"][0].shape[0])
        if set(f.factors) != set(mlp.family.roles()) or len({r.shape[0] for _, r in f.factors.values()}) != 1:
            raise ValueError(f"LowRankMLP needs factors for {sorted(mlp.family.roles())} of one common rank")
        biases = {"gate": None, "up": f.up_bias, "down": f.down_bias}
        for role, (left, right) in f.factors.items():
            _replace(mlp, role, _lowrank(left, right, biases[role]))
    else:
        raise TypeError(f"cannot write a {type(compressed).__name__}")


# ---------------------------------------------------------------------------------------------
# structure records (resume without re-compressing), re-init, export


def layer_spec(model: nn.Module, layer: int) -> dict:
    """The layer's current MLP structure, e.g. {"kind": "fused", "width": 16, "scaled": True,
    "rank": None, "up_bias": True, "down_bias": True}; kind is "dense" (pretrained modules and
    width), "fused" (width-k Linear/ScaledLinear) or "lowrank". Plain data, for the run's config."""
    mlp = _layer(model, layer)
    mods = mlp_modules(model, layer)
    down, width = mods["down"], _shape(mods["up"])[0]
    native = Conv1D if mlp.family.conv1d else nn.Linear
    if isinstance(down, LowRankLinear):
        kind = "lowrank"
    elif all(type(m) is native for m in mods.values()) and width == config_width(_config(model)):
        kind = "dense"
    else:
        kind = "fused"
    return {"kind": kind, "width": width, "scaled": isinstance(down, ScaledLinear),
            "rank": down.rank if kind == "lowrank" else None,
            "up_bias": _bias(mods["up"]) is not None, "down_bias": _bias(down) is not None}


def _empty(fam: Family, spec: dict, role: str, out_f: int, in_f: int) -> nn.Module:
    bias = {"gate": False, "up": spec["up_bias"], "down": spec["down_bias"]}[role]
    if spec["kind"] == "lowrank":
        return LowRankLinear(in_f, out_f, spec["rank"], bias)
    if spec["kind"] == "dense" and fam.conv1d:
        assert bias, "Conv1D always has a bias"
        return Conv1D(out_f, in_f)
    if role == "down" and spec["scaled"]:
        return ScaledLinear(in_f, out_f, bias, torch.zeros(in_f))
    return nn.Linear(in_f, out_f, bias=bias)


@torch.no_grad()
def build_from_spec(model: nn.Module, layer: int, spec: dict) -> None:
    """Replace the layer's projections with zero-initialised modules of the structure ``spec``
    (from ``layer_spec``), ready for ``load_state_dict`` of a checkpoint."""
    mlp = _layer(model, layer)
    if spec["kind"] not in ("dense", "fused", "lowrank"):
        raise ValueError(f"unknown MLP kind {spec['kind']!r}")
    h, k = _shape(mlp.module("down"))[0], spec["width"]
    for role in mlp.family.roles():
        new = _empty(mlp.family, spec, role, *((h, k) if role == "down" else (k, h)))
        for t in (*new.parameters(), *new.buffers()):
            t.zero_()
        _replace(mlp, role, new)


def reinit_mlp(model: nn.Module, layer: int) -> None:
    """Re-initialise the layer's MLP weights like the model's default init: weights N(0, initializer_range)
    (GPT-2's down projection / sqrt(2 n_layer)), biases zero; a ScaledLinear's scale is kept."""
    mlp = _layer(model, layer)
    cfg = _config(model)
    std = getattr(cfg, "initializer_range", 0.02)
    for role, m in mlp_modules(model, layer).items():
        s = std / math.sqrt(2 * cfg.num_hidden_layers) if role == "down" and mlp.family.residual_init else std
        # torch's init, not transformers.initialization: the latter skips params flagged _is_hf_initialized
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, s)


def fold_scales(model: nn.Module) -> int:
    """Replace every ScaledLinear by its folded nn.Linear (same outputs; for export). Returns how many."""
    scaled = [name for name, m in model.named_modules() if isinstance(m, ScaledLinear)]
    for name in scaled:
        model.set_submodule(name, model.get_submodule(name).fold())
    return len(scaled)
