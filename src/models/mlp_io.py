"""The one place that reads and writes each architecture's transformer MLPs.

Everything else sees ``src.compress.types`` containers in the ``nn.Linear`` layout ``[out, in]``.
A family is recognised by the module structure found in the model (no modeling code is copied or
forked); compressed layers keep the Hugging Face module tree (``intermediate.dense``,
``mlp.c_fc``, ``mlp.down_proj``...) with only the projection modules swapped, so the stock
forward still runs.

Mixture-of-Experts blocks (Mixtral, OLMoE, Qwen2-MoE; transformers 5) hold their routed experts as
one module with fused 3-D parameters, ``experts.gate_up_proj`` [E, 2d, h] (gate rows first, then up)
and ``experts.down_proj`` [E, h, d], no biases, a router ``gate.weight`` [E, h] and, in Qwen2-MoE,
a ``shared_expert`` (a plain gated MLP) with a ``shared_expert_gate`` [1, h]. A block's parts are
its experts (``"0"``, ``"1"``, ...) and ``"shared"``; each part reads as an ``MLPWeights``. The
compressed experts of a block are written back as one stock experts module of one width (the
widest part; narrower experts zero-padded), a frozen ``[E, k]`` count scale applied as a
parametrization of ``down_proj`` (``ExpertScale``), low-rank experts as a factor parametrization
(``ExpertLowRank``). The router and the shared-expert gate are never touched.

Encoder-decoder models (T5, Switch Transformers) number their blocks encoder first, then decoder:
layer ``i < n_enc`` is ``encoder.block[i]``, layer ``n_enc + j`` is ``decoder.block[j]``; each block's
MLP sits in its last sub-layer (``layer[-1]``). T5 keeps ``DenseReluDense`` with ``wi`` [d_ff, d] and
``wo`` [d, d_ff] (gated: ``wi_0`` the gate, ``wi_1`` the up projection), no biases, the activation
``config.dense_act_fn``. Switch Transformers' sparse blocks (every ``encoder_sparse_step``-th encoder
block, ``i % step == 1``, and likewise in the decoder) hold ``mlp.router.classifier`` [E, d] and
``mlp.experts``, a ``ModuleDict`` of ``expert_<e>`` ReLU MLPs in T5's ``wi``/``wo`` layout; the other
blocks' ``mlp`` is one such MLP, of the same width ``d_ff``. Its compressed experts are written back
as ``nn.Linear`` modules of one width per block, the count scale a ``ScaledLinear`` ``wo`` per expert
(the rows of the block's [E, k] scale).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from src.compress.types import Compressed, FusedMLP, LowRankMLP, MLPWeights
from src.models.layers import ExpertLowRank, ExpertScale, LowRankLinear, ScaledLinear


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
    gated_attr: str | None = None  # config attribute telling gated from plain MLPs where one model_type has both (T5)
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
    Family("t5", ("t5",), up="wi", down="wo", act="act", input="", act_attr="dense_act_fn", width_attr="d_ff",
           gated_attr="is_gated_act"),
    Family("t5_gated", ("t5",), gate="wi_0", up="wi_1", down="wo", act="act", input="", act_attr="dense_act_fn",
           width_attr="d_ff", gated_attr="is_gated_act"),
)
GATED = FAMILIES[3]
# Switch Transformers' dense blocks and each of its experts: T5's wi / wo, reached through MOE_FAMILIES only
SWITCH_MLP = Family("switch_mlp", (), up="wi", down="wo", act="act", input="", act_attr="dense_act_fn", width_attr="d_ff")


@dataclass(frozen=True)
class MoEFamily:
    """A Mixture-of-Experts layout: config attributes, and the block's children (relative to ``mlp``)."""

    name: str
    model_types: tuple[str, ...]
    experts_attr: str  # config attribute: number of routed experts
    width_attr: str  # config attribute: each routed expert's intermediate size
    shared_width_attr: str | None = None  # config attribute: the shared expert's width (None: no shared expert)
    act_attr: str = "hidden_act"
    experts: str = "experts"  # gate_up_proj [E, 2d, h], down_proj [E, h, d]
    router: str = "gate"  # weight [E, h]
    shared: str = "shared_expert"  # a gated MLP (gate_proj / up_proj / down_proj)
    block_re: str = r"layers\.\d+\.mlp"  # the end of a block's MLP name (sparse or dense), in block order
    dense: Family = GATED  # the layout of the dense blocks' MLPs (and of each expert where expert_prefix is set)
    dense_width_attr: str = "intermediate_size"  # config attribute: the dense blocks' width
    expert_prefix: str | None = None  # experts module is a ModuleDict of dense MLPs "<prefix><e>" (Switch), not fused

    def sparse_layers(self, config: PretrainedConfig) -> list[int]:
        """The blocks that hold experts; Qwen2-MoE's others are dense gated MLPs (``mlp_only_layers``,
        ``decoder_sparse_step``); Switch Transformers': block i of a stack is sparse when
        ``i % step == 1`` (every block for step 1, none for step 0)."""
        n = num_blocks(config)
        if self.name == "switch":
            steps = (config.encoder_sparse_step, config.decoder_sparse_step)
            return [b for rng, step in zip(stacks(config), steps) for i, b in enumerate(rng) if step > 0 and (step == 1 or i % step == 1)]
        if self.name != "qwen2_moe":
            return list(range(n))
        dense = set(config.mlp_only_layers or [])
        step = config.decoder_sparse_step
        return [i for i in range(n) if i not in dense and config.num_experts > 0 and (i + 1) % step == 0]


MOE_FAMILIES = (
    MoEFamily("mixtral", ("mixtral",), experts_attr="num_local_experts", width_attr="intermediate_size"),
    MoEFamily("olmoe", ("olmoe",), experts_attr="num_experts", width_attr="intermediate_size"),
    MoEFamily("qwen2_moe", ("qwen2_moe",), experts_attr="num_experts", width_attr="moe_intermediate_size",
              shared_width_attr="shared_expert_intermediate_size"),
    MoEFamily("switch", ("switch_transformers",), experts_attr="num_experts", width_attr="d_ff", act_attr="dense_act_fn",
              router="router", block_re=r"block\.\d+\.layer\.\d+\.mlp", dense=SWITCH_MLP, dense_width_attr="d_ff",
              expert_prefix="expert_"),
)
SHARED = "shared"  # the part name of a block's shared expert; routed experts are "0", "1", ...
_SUPPORTED = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in (*FAMILIES, *MOE_FAMILIES))


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


@dataclass(frozen=True)
class MoEBlock:
    """One transformer block's sparse MLP (router, routed experts, optional shared expert)."""

    family: MoEFamily
    path: str
    root: nn.Module

    @property
    def experts(self) -> nn.Module:
        return self.root.get_submodule(self.family.experts)

    @property
    def shared(self) -> MLPLayer | None:
        """The shared expert as a plain gated MLP layer (Qwen2-MoE), else None."""
        if self.family.shared_width_attr is None:
            return None
        return MLPLayer(GATED, f"{self.path}.{self.family.shared}", self.root.get_submodule(self.family.shared))

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def expert(self, e: int) -> MLPLayer:
        """Routed expert ``e`` as a dense MLP layer (layouts that keep one module per expert: Switch)."""
        prefix = self.family.expert_prefix
        assert prefix is not None, f"{self.family.name} fuses its experts into one module"
        return MLPLayer(self.family.dense, f"{self.path}.{self.family.experts}.{prefix}{e}", self.experts[f"{prefix}{e}"])

    @property
    def width(self) -> int:
        """The experts' common (padded) intermediate size."""
        if self.family.expert_prefix:
            return _shape(self.expert(0).module("up"))[0]
        return self.experts.intermediate_dim

    @property
    def hidden_size(self) -> int:
        return _shape(self.expert(0).module("down"))[0] if self.family.expert_prefix else self.experts.hidden_dim


AnyLayer = MLPLayer | MoEBlock


# ---------------------------------------------------------------------------------------------
# discovery


def family_of(config: PretrainedConfig) -> Family | MoEFamily:
    """The MLP family of a model from its config alone (before loading); ValueError if unsupported."""
    for fam in (*FAMILIES, *MOE_FAMILIES):
        if config.model_type not in fam.model_types:
            continue
        if not isinstance(fam, Family) or fam.gated_attr is None or bool(getattr(config, fam.gated_attr)) == bool(fam.gate):
            return fam
    raise ValueError(f"model_type {config.model_type!r} is not supported; supported MLP families: {_SUPPORTED}")


def moe_family(config: PretrainedConfig) -> MoEFamily | None:
    """The MoE layout of a config, or None for a dense model."""
    fam = family_of(config)
    return fam if isinstance(fam, MoEFamily) else None


def config_width(config: PretrainedConfig) -> int:
    """The pretrained MLP intermediate size a config describes (GPT-2: ``n_inner=None`` means 4h; MoE:
    one routed expert's)."""
    return getattr(config, family_of(config).width_attr) or 4 * config.hidden_size


def num_blocks(config: PretrainedConfig) -> int:
    """Transformer blocks with an MLP: an encoder-decoder model's encoder and decoder blocks together."""
    if getattr(config, "is_encoder_decoder", False):
        return config.num_layers + config.num_decoder_layers
    return config.num_hidden_layers


def stacks(config: PretrainedConfig) -> list[range]:
    """The layer indices of each stack: [encoder, decoder] for an encoder-decoder model, else one range."""
    if getattr(config, "is_encoder_decoder", False):
        return [range(config.num_layers), range(config.num_layers, num_blocks(config))]
    return [range(num_blocks(config))]


def in_decoder(model: nn.Module, layer: int) -> bool:
    """Whether the layer is a decoder block of an encoder-decoder model (its tokens are the decoder's)."""
    config = _config(model)
    return getattr(config, "is_encoder_decoder", False) and layer >= config.num_layers


def vmappable(model: nn.Module) -> bool:
    """Whether per-sample gradients of the model batch under ``torch.func.vmap``: not Switch
    Transformers', whose experts dispatch tokens by data-dependent indexing (``nonzero``) and whose
    router reassigns its classifier module in every forward (``self.classifier.to(dtype)``)."""
    fam = moe_family(_config(model))
    return fam is None or fam.expert_prefix is None


def mlp_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(number of transformer blocks, MLP intermediate size) from a config alone, before weights load."""
    return num_blocks(config), config_width(config)


def sparse_layers(config: PretrainedConfig) -> list[int]:
    """The blocks whose MLP holds experts (empty for a dense model)."""
    fam = moe_family(config)
    return fam.sparse_layers(config) if fam else []


def num_experts(config: PretrainedConfig) -> int:
    """Routed experts per sparse block (0 for a dense model)."""
    fam = moe_family(config)
    return getattr(config, fam.experts_attr) if fam else 0


def mlp_param_count(config: PretrainedConfig) -> int:
    """Parameters of one pretrained MLP of a config: 3hd gated (no biases), else 2hd + d + h; a sparse
    block: every routed expert and the shared expert."""
    fam, h, d = family_of(config), config.hidden_size, config_width(config)
    if isinstance(fam, MoEFamily):
        shared = getattr(config, fam.shared_width_attr) if fam.shared_width_attr else 0
        per_neuron = 2 * h if fam.expert_prefix and not fam.dense.gate else 3 * h  # Switch: wi, wo
        return per_neuron * num_experts(config) * d + 3 * h * shared
    return 3 * h * d if fam.gate else 2 * h * d + d + h


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


def _moe_blocks(model: nn.Module, fam: MoEFamily, config: PretrainedConfig) -> list[AnyLayer]:
    """Every block's MLP (``...layers.<i>.mlp``; Switch: ``encoder.block.<i>.layer.<j>.mlp``, then the
    decoder's) in layer order (``named_modules`` visits blocks in order, the encoder's first): sparse
    ones as MoEBlock, dense ones (Qwen2-MoE's ``mlp_only_layers``, Switch's other blocks) as MLP layers."""
    pattern = re.compile(rf"(^|\.){fam.block_re}$")
    found: list[AnyLayer] = []
    for name, m in model.named_modules():
        if pattern.search(name):
            sparse = _has(m, fam.experts) and _has(m, fam.router)
            found.append(MoEBlock(fam, name, m) if sparse else MLPLayer(fam.dense, name, m))
    if len(found) != num_blocks(config):
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected {num_blocks(config)} "
                         f"block MLPs matching {fam.block_re!r}, found {[b.path for b in found]}")
    return found


def find_mlp_layers(model: nn.Module) -> list[AnyLayer]:
    """The transformer blocks' MLPs in layer order; ValueError for an unsupported architecture."""
    config = next((m.config for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    moe = next((f for f in MOE_FAMILIES if config is not None and config.model_type in f.model_types), None)
    if moe is not None:
        return _moe_blocks(model, moe, config)
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


def _layer(model: nn.Module, layer: int) -> AnyLayer:
    layers = find_mlp_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range: {type(model).__name__} has {len(layers)} MLP layers")
    return layers[layer]


def _block(model: nn.Module, layer: int) -> MoEBlock:
    mlp = _layer(model, layer)
    if not isinstance(mlp, MoEBlock):
        raise ValueError(f"layer {layer} of {type(model).__name__} has no experts (a dense MLP)")
    return mlp


def num_layers(model: nn.Module) -> int:
    """Number of transformer MLPs in the model."""
    return len(find_mlp_layers(model))


def is_sparse(model: nn.Module, layer: int) -> bool:
    """Whether the layer's MLP is a Mixture-of-Experts block."""
    return isinstance(_layer(model, layer), MoEBlock)


def mlp_parts(model: nn.Module, layer: int, experts: Sequence[int] | str = "all", shared_expert: bool = True) -> list[str | None]:
    """What to compress in a layer: ``[None]`` (the MLP itself) for a dense layer; for a sparse block
    the chosen routed experts (``"0"``, ``"1"``, ...; ``experts="all"`` or a list of ids) and, where
    the block has one and ``shared_expert`` is set, ``"shared"``."""
    mlp = _layer(model, layer)
    if not isinstance(mlp, MoEBlock):
        return [None]
    ids = range(mlp.num_experts) if experts == "all" else list(experts)
    bad = [e for e in ids if not 0 <= e < mlp.num_experts]
    if bad:
        raise IndexError(f"experts {bad} out of range: layer {layer} has experts 0..{mlp.num_experts - 1}")
    return [str(e) for e in ids] + ([SHARED] if shared_expert and mlp.shared is not None else [])


@torch.no_grad()
def routed_tokens(model: nn.Module, layer: int, x: Tensor) -> dict[str, Tensor]:
    """Which of a sparse block's input tokens x [T, h] each part sees, as masks [T] bool: a routed
    expert its tokens under the block's own router (its top-k; Switch: the top-1, the per-batch
    expert capacity left out), the shared expert every token."""
    block = _block(model, layer)
    router = block.root.get_submodule(block.family.router)
    if block.family.expert_prefix:  # Switch: the classifier's top-1 (its forward also applies the capacity)
        chosen = router.classifier(x.to(router.classifier.weight.dtype)).argmax(-1, keepdim=True)  # [T, 1]
    else:  # the TopK routers return (logits, scores, indices [T, k])
        chosen = router(x.to(router.weight.dtype))[2]
    masks = {str(e): (chosen == e).any(-1) for e in range(block.num_experts)}
    if block.shared is not None:
        masks[SHARED] = torch.ones(len(x), dtype=torch.bool, device=x.device)
    return masks


def mlp_modules(model: nn.Module, layer: int) -> dict[str, nn.Module]:
    """The layer's projection modules by role ("gate" when gated, "up", "down"), whatever their kind;
    a sparse block: its experts module ("experts") and the shared expert's ("shared_gate", ...)."""
    mlp = _layer(model, layer)
    if isinstance(mlp, MoEBlock):
        shared = mlp.shared
        return {"experts": mlp.experts} | ({f"shared_{r}": shared.module(r) for r in shared.family.roles()} if shared else {})
    return {role: mlp.module(role) for role in mlp.family.roles()}


def mlp_param_names(model: nn.Module, layer: int) -> list[str]:
    """Full names (as in ``model.named_parameters()``) of the layer's MLP projection parameters (a sparse
    block: every routed expert's and the shared expert's; never the router's or the shared-expert gate's)."""
    mlp = _layer(model, layer)
    if isinstance(mlp, MoEBlock):
        names = [f"{mlp.path}.{mlp.family.experts}.{n}" for n, _ in mlp.experts.named_parameters()]
        return names + (_dense_param_names(mlp.shared) if mlp.shared else [])
    return _dense_param_names(mlp)


def _dense_param_names(mlp: MLPLayer) -> list[str]:
    prefix = f"{mlp.path}." if mlp.path else ""
    return [f"{prefix}{path}.{name}" for path in mlp.family.roles().values()
            for name, _ in mlp.root.get_submodule(path).named_parameters()]


def mlp_input_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose first positional input is the MLP's input hidden states (for a forward pre-hook)."""
    mlp = _layer(model, layer)
    return mlp.root if isinstance(mlp, MoEBlock) else mlp.root.get_submodule(mlp.family.input)


def block_module(model: nn.Module, layer: int) -> nn.Module | None:
    """The transformer block holding the layer's MLP, the outermost ``ModuleList`` element on its path
    (``model.layers.3``, ``bert.encoder.layer.3``), for a model whose blocks form one chain, each
    block's output the next one's input; None for an encoder-decoder model (its decoder blocks also
    read the encoder's output)."""
    if len(stacks(_config(model))) > 1:
        return None
    path = _layer(model, layer).path.split(".")
    for j in range(1, len(path)):
        if path[j].isdigit() and isinstance(parent := model.get_submodule(".".join(path[:j])), nn.ModuleList):
            return parent[int(path[j])]
    return None


def mlp_forward(model: nn.Module, layer: int, x: Tensor) -> Tensor:
    """The layer's MLP on hidden states ``x`` [..., h] -> [..., h]: no dropout, residual or norm (a
    sparse block: router, experts and shared expert, as the block computes them)."""
    mlp = _layer(model, layer)
    if isinstance(mlp, MoEBlock):
        # the block takes [B, T, h]; sequences stay sequences (Switch's expert capacity counts per sequence)
        return mlp.root(x if x.ndim == 3 else x.reshape(1, -1, x.shape[-1])).reshape(x.shape)
    return _dense_forward(mlp, x)


def _dense_forward(mlp: MLPLayer, x: Tensor) -> Tensor:
    act = mlp.root.get_submodule(mlp.family.act)
    hid = act(mlp.module("gate")(x)) * mlp.module("up")(x) if mlp.family.gate else act(mlp.module("up")(x))
    return mlp.module("down")(hid)  # [..., k] -> [..., h]


@torch.no_grad()
def router_counts(model: nn.Module, layer: int, x: Tensor) -> Tensor:
    """How many of the tokens ``x`` [N, h] the block's router sends to each expert, [E] (each token
    counts once for each of its top-k experts)."""
    block = _block(model, layer)
    router = block.root.get_submodule(block.family.router)
    if block.family.expert_prefix:  # Switch: (capacity-masked one-hot, top-1 prob, logits [1, N, E]); top-1 before capacity
        chosen = router(x[None])[2].argmax(-1)
    else:
        _, _, chosen = router(x)  # (logits, top-k weights, top-k ids [N, k])
    return torch.bincount(chosen.reshape(-1), minlength=block.num_experts)


def _activation(model: nn.Module, fam: Family | MoEFamily) -> str:
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
    """The current intermediate size (width) of every MLP layer (a sparse block: its experts')."""
    return [mlp.width if isinstance(mlp, MoEBlock) else _shape(mlp.module("up"))[0] for mlp in find_mlp_layers(model)]


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
def read_mlp(model: nn.Module, layer: int, part: str | None = None) -> MLPWeights:
    """The layer's MLP in the [out, in] layout (copies). A compressed layer reads as the dense MLP it
    computes: scales folded into ``down``, low-rank factors multiplied out. In a sparse block ``part``
    names a routed expert (``"0"``, ...) or ``"shared"``."""
    mlp = _layer(model, layer)
    if isinstance(mlp, MoEBlock):
        if part is None:
            raise ValueError(f"layer {layer} is a Mixture-of-Experts block: name a part, one of {mlp_parts(model, layer)}")
        return _read_expert(model, mlp, part)
    if part is not None:
        raise ValueError(f"layer {layer} is a dense MLP: it has no part {part!r}")
    return _read_dense(model, mlp)


def _read_dense(model: nn.Module, mlp: MLPLayer) -> MLPWeights:
    mods = {role: mlp.module(role) for role in mlp.family.roles()}
    if "gate" in mods and _bias(mods["gate"]) is not None:
        raise ValueError("gated MLPs with a gate bias (mlp_bias=True) are not supported")
    w = {role: _effective_weight(m).detach().clone() for role, m in mods.items()}
    b = {role: None if _bias(m) is None else _bias(m).detach().clone() for role, m in mods.items()}
    return MLPWeights(up=w["up"], down=w["down"], up_bias=b["up"], down_bias=b["down"], gate=w.get("gate"),
                      activation=_activation(model, mlp.family))


def _read_expert(model: nn.Module, block: MoEBlock, part: str) -> MLPWeights:
    if part == SHARED:
        if block.shared is None:
            raise ValueError(f"{block.path} has no shared expert")
        return _read_dense(model, block.shared)
    e = int(part)
    if not 0 <= e < block.num_experts:
        raise IndexError(f"expert {e} out of range: {block.path} has experts 0..{block.num_experts - 1}")
    if block.family.expert_prefix:
        return _read_dense(model, block.expert(e))
    ex, k = block.experts, block.width
    gate_up, down = ex.gate_up_proj[e], ex.down_proj[e]  # [2k, h] (gate rows, then up rows), [h, k]; parametrizations applied
    return MLPWeights(up=gate_up[k:].detach().clone(), down=down.detach().clone(), gate=gate_up[:k].detach().clone(),
                      activation=_activation(model, block.family))


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


def write_mlp(model: nn.Module, layer: int, compressed: MLPWeights | Compressed, part: str | None = None) -> None:
    """Write a layer's MLP: ``MLPWeights`` are copied into the existing same-width modules; a
    ``FusedMLP`` replaces the projections with nn.Linear of width k (down: ScaledLinear when it has a
    scale); a ``LowRankMLP`` replaces each projection with a LowRankLinear. In a sparse block ``part``
    names the expert (see ``write_parts``, which writes several experts at once)."""
    mlp = _layer(model, layer)
    if isinstance(mlp, MoEBlock):
        if part is None:
            raise ValueError(f"layer {layer} is a Mixture-of-Experts block: name a part, one of {mlp_parts(model, layer)}")
        write_parts(model, layer, {part: compressed})
    elif part is not None:
        raise ValueError(f"layer {layer} is a dense MLP: it has no part {part!r}")
    else:
        _write_dense(model, mlp, compressed)


def _write_dense(model: nn.Module, mlp: MLPLayer, compressed: MLPWeights | Compressed) -> None:
    if isinstance(compressed, MLPWeights):
        w = compressed
        _check_compatible(model, mlp, w.activation, w.is_gated, w.hidden_size)
        biases = {"gate": None, "up": w.up_bias, "down": w.down_bias}
        for role in mlp.family.roles():
            _copy_dense(mlp.module(role), getattr(w, role), biases[role])
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


def _stock_experts(block: MoEBlock, model: nn.Module, width: int) -> nn.Module:
    """A new, uninitialised experts module of the block's own (stock transformers) class at ``width``."""
    old = block.experts
    cls = type(old).__mro__[1] if parametrize.is_parametrized(old) else type(old)  # past parametrize's injected class
    config = copy.copy(getattr(old, "config", None) or _config(model))  # keeps _experts_implementation
    setattr(config, block.family.width_attr, width)
    device, dtype = _device_dtype(old)
    with torch.device("meta"):
        new = cls(config)
    return new.to_empty(device=device).to(dtype)


def _check_expert(model: nn.Module, block: MoEBlock, activation: str, gated: bool, hidden: int) -> None:
    want_gated = bool(block.family.dense.gate) if block.family.expert_prefix else True
    if activation != _activation(model, block.family) or gated != want_gated or hidden != block.hidden_size:
        raise ValueError(f"an expert of {block.path} must be a {'gated' if want_gated else 'non-gated'} {_activation(model, block.family)!r} "
                         f"MLP of hidden size {block.hidden_size}, got {'gated' if gated else 'non-gated'} {activation!r} of {hidden}")


@torch.no_grad()
def write_parts(model: nn.Module, layer: int, results: dict[str, MLPWeights | Compressed]) -> None:
    """Write several parts of a sparse block at once (``{"0": ..., "shared": ...}``, see ``mlp_parts``).

    The routed experts stay one stock experts module of one width: the widest expert's (parts not
    written keep their current weights); a narrower expert is zero-padded, and its padding neurons
    get scale 0. A ``FusedMLP``'s count scale, or any padding, becomes an ``ExpertScale``
    parametrization of ``down_proj`` with a frozen [E, k] scale (1 for unscaled neurons). Low-rank
    experts (``LowRankMLP``) must cover every expert of the block at one rank: they become an
    ``ExpertLowRank`` parametrization of ``gate_up_proj`` and ``down_proj``. The shared expert is
    written like a dense gated MLP; the router is left as it is.
    """
    block = _block(model, layer)
    results = dict(results)
    if SHARED in results:
        if block.shared is None:
            raise ValueError(f"{block.path} has no shared expert")
        _write_dense(model, block.shared, results.pop(SHARED))
    if not results:
        return
    experts = {int(p): c for p, c in results.items()}
    if any(not 0 <= e < block.num_experts for e in experts):
        raise IndexError(f"experts {sorted(experts)} out of range: {block.path} has experts 0..{block.num_experts - 1}")
    if any(isinstance(c, LowRankMLP) for c in experts.values()):
        _write_lowrank_experts(model, block, experts)
        return
    # every expert as (weights, scale or None): the new results, the current weights for the rest
    current = {e: (_read_expert(model, block, str(e)), None) for e in range(block.num_experts) if e not in experts}
    new = {e: (c.weights, c.scale) if isinstance(c, FusedMLP) else (c, None) for e, c in experts.items()}
    parts = {**current, **new}
    for w, _ in parts.values():
        _check_expert(model, block, w.activation, w.is_gated, w.hidden_size)
    k = max(w.width for w, _ in parts.values())
    scaled = any(s is not None or w.width < k for w, s in parts.values())
    if block.family.expert_prefix:
        _write_expert_modules(block, parts, k, scaled)
        return
    module = _stock_experts(block, model, k)
    gate_up = torch.zeros_like(module.gate_up_proj)  # [E, 2k, h]
    down = torch.zeros_like(module.down_proj)  # [E, h, k]
    scale = torch.zeros(block.num_experts, k, dtype=down.dtype, device=down.device)  # [E, k]; padding stays 0
    for e, (w, s) in parts.items():
        d = w.width
        gate_up[e, :d], gate_up[e, k : k + d], down[e, :, :d] = w.gate, w.up, w.down
        scale[e, :d] = 1 if s is None else s
    module.gate_up_proj.copy_(gate_up)
    module.down_proj.copy_(down)
    if scaled:
        parametrize.register_parametrization(module, "down_proj", ExpertScale(scale))
    block.root.set_submodule(block.family.experts, module)


def _write_expert_modules(block: MoEBlock, parts: dict[int, tuple[MLPWeights, Tensor | None]], k: int, scaled: bool) -> None:
    """Every expert of a block that keeps one module per expert (Switch) at width ``k``: ``wi`` an
    nn.Linear [k, h], ``wo`` an nn.Linear [h, k] or, when ``scaled``, a ScaledLinear whose scale [k] is
    the expert's row of the block's [E, k] count scale (1 for unscaled neurons, 0 on the padding)."""
    for e, (w, s) in parts.items():
        d = w.width
        up, down = w.up.new_zeros(k, w.hidden_size), w.down.new_zeros(w.hidden_size, k)  # zero-padded to k
        up[:d], down[:, :d] = w.up, w.down
        scale = down.new_zeros(k)
        scale[:d] = 1 if s is None else s
        mlp = block.expert(e)
        _replace(mlp, "up", _linear(up, None))
        _replace(mlp, "down", _linear(down, None, scale if scaled else None))


def _write_lowrank_experts(model: nn.Module, block: MoEBlock, experts: dict[int, Compressed]) -> None:
    if sorted(experts) != list(range(block.num_experts)) or not all(isinstance(c, LowRankMLP) for c in experts.values()):
        raise ValueError(f"low-rank experts must cover every expert of {block.path} (0..{block.num_experts - 1}), all low rank")
    fs = [experts[e] for e in range(block.num_experts)]
    roles = set(block.family.dense.roles()) if block.family.expert_prefix else {"gate", "up", "down"}
    if len({c.rank for c in fs}) != 1 or any(set(c.factors) != roles for c in fs):
        raise ValueError(f"low-rank experts of {block.path} need {', '.join(sorted(roles))} factors of one common rank")
    if block.family.expert_prefix:  # one LowRankLinear per projection of each expert
        for e, c in enumerate(fs):
            _write_dense(model, block.expert(e), c)
        return
    for c in fs:
        _check_expert(model, block, c.activation, True, c.factors["down"][0].shape[0])
    module = _stock_experts(block, model, fs[0].factors["up"][0].shape[0])
    stack = lambda role, side: torch.stack([c.factors[role][side] for c in fs])  # noqa: E731  [E, out, r] / [E, r, in]
    gate_up = [(stack("gate", 0), stack("gate", 1)), (stack("up", 0), stack("up", 1))]
    parametrize.register_parametrization(module, "gate_up_proj", ExpertLowRank(gate_up))
    parametrize.register_parametrization(module, "down_proj", ExpertLowRank([(stack("down", 0), stack("down", 1))]))
    block.root.set_submodule(block.family.experts, module)


# ---------------------------------------------------------------------------------------------
# structure records (resume without re-compressing), re-init, export


def layer_spec(model: nn.Module, layer: int) -> dict:
    """The layer's current MLP structure, e.g. {"kind": "fused", "width": 16, "scaled": True,
    "rank": None, "up_bias": True, "down_bias": True}; kind is "dense" (pretrained modules and
    width), "fused" (width-k Linear/ScaledLinear) or "lowrank". A sparse block: {"kind": "moe",
    "experts": {"kind", "width", "scaled", "rank"}, "shared": the shared expert's spec or None}.
    Plain data, for the run's config."""
    mlp, config = _layer(model, layer), _config(model)
    if isinstance(mlp, MoEBlock):
        return _block_spec(model, mlp)
    # a dense block of a MoE model (Qwen2-MoE's mlp_only_layers: config.intermediate_size; Switch: d_ff)
    fam = moe_family(config)
    return _dense_spec(mlp, getattr(config, fam.dense_width_attr) if fam else config_width(config))


def _dense_spec(mlp: MLPLayer, pretrained_width: int) -> dict:
    mods = {role: mlp.module(role) for role in mlp.family.roles()}
    down, width = mods["down"], _shape(mods["up"])[0]
    native = Conv1D if mlp.family.conv1d else nn.Linear
    if isinstance(down, LowRankLinear):
        kind = "lowrank"
    elif all(type(m) is native for m in mods.values()) and width == pretrained_width:
        kind = "dense"
    else:
        kind = "fused"
    return {"kind": kind, "width": width, "scaled": isinstance(down, ScaledLinear),
            "rank": down.rank if kind == "lowrank" else None,
            "up_bias": _bias(mods["up"]) is not None, "down_bias": _bias(down) is not None}


def _block_spec(model: nn.Module, block: MoEBlock) -> dict:
    ex, config = block.experts, _config(model)
    if block.family.expert_prefix:  # one module per expert, all of one structure (write_parts): expert 0's
        spec = _dense_spec(block.expert(0), config_width(config))
        return {"kind": "moe", "experts": {k: spec[k] for k in ("kind", "width", "scaled", "rank")}, "shared": None}
    lowrank = parametrize.is_parametrized(ex, "gate_up_proj")
    scaled = not lowrank and parametrize.is_parametrized(ex, "down_proj")
    kind = "lowrank" if lowrank else "dense" if not scaled and block.width == config_width(config) else "fused"
    rank = ex.parametrizations.gate_up_proj.original0.shape[-1] if lowrank else None
    shared = block.shared
    return {"kind": "moe", "experts": {"kind": kind, "width": block.width, "scaled": scaled, "rank": rank},
            "shared": _dense_spec(shared, getattr(config, block.family.shared_width_attr)) if shared else None}


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
    if spec["kind"] == "moe":
        if not isinstance(mlp, MoEBlock):
            raise ValueError(f"layer {layer} has no experts, but its recorded structure is a Mixture-of-Experts block")
        _build_block(model, mlp, spec)
    elif spec["kind"] not in ("dense", "fused", "lowrank"):
        raise ValueError(f"unknown MLP kind {spec['kind']!r}")
    else:
        _build_dense(mlp, spec)


def _build_dense(mlp: MLPLayer, spec: dict) -> None:
    h, k = _shape(mlp.module("down"))[0], spec["width"]
    for role in mlp.family.roles():
        new = _empty(mlp.family, spec, role, *((h, k) if role == "down" else (k, h)))
        for t in (*new.parameters(), *new.buffers()):
            t.zero_()
        _replace(mlp, role, new)


def _build_block(model: nn.Module, block: MoEBlock, spec: dict) -> None:
    ex = spec["experts"]
    if ex["kind"] not in ("dense", "fused", "lowrank"):
        raise ValueError(f"unknown experts kind {ex['kind']!r}")
    if block.family.expert_prefix:  # Switch: each expert's wi / wo, no biases
        for e in range(block.num_experts):
            _build_dense(block.expert(e), {**ex, "up_bias": False, "down_bias": False})
        return
    module = _stock_experts(block, model, ex["width"])
    module.gate_up_proj.zero_()
    module.down_proj.zero_()
    E, h, k = block.num_experts, module.hidden_dim, ex["width"]
    if ex["kind"] == "lowrank":
        z = lambda *shape: module.down_proj.new_zeros(shape)  # noqa: E731
        r = ex["rank"]
        parametrize.register_parametrization(module, "gate_up_proj", ExpertLowRank([(z(E, k, r), z(E, r, h)), (z(E, k, r), z(E, r, h))]))
        parametrize.register_parametrization(module, "down_proj", ExpertLowRank([(z(E, h, r), z(E, r, k))]))
    elif ex["scaled"]:
        parametrize.register_parametrization(module, "down_proj", ExpertScale(module.down_proj.new_zeros(E, k)))
    block.root.set_submodule(block.family.experts, module)
    if spec["shared"] is not None:
        _build_dense(block.shared, spec["shared"])


def reinit_mlp(model: nn.Module, layer: int) -> None:
    """Re-initialise the layer's MLP weights like the model's default init: weights N(0, initializer_range)
    (GPT-2's down projection / sqrt(2 n_layer)), biases zero; a count scale (ScaledLinear, ExpertScale)
    is kept. A sparse block: its experts and shared expert, not the router."""
    mlp = _layer(model, layer)
    cfg = _config(model)
    std = getattr(cfg, "initializer_range", 0.02)
    residual = isinstance(mlp, MLPLayer) and mlp.family.residual_init
    for role, m in mlp_modules(model, layer).items():
        s = std / math.sqrt(2 * cfg.num_hidden_layers) if role == "down" and residual else std
        # torch's init, not transformers.initialization: the latter skips params flagged _is_hf_initialized
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, s)


def stock_widths(model: nn.Module) -> dict[str, int] | None:
    """{config attribute: width} when every layer is a plain stock MLP (no count scale, no factors)
    and each width attribute takes one value across layers: written into ``config.json``, the folder
    then loads with plain ``from_pretrained``. None otherwise. A sparse block contributes its experts'
    width and its shared expert's, a dense block of a MoE model its own attribute's: Qwen2-MoE's
    ``intermediate_size``; Switch Transformers' ``d_ff``, the experts' too, so that a stock Switch
    model needs every dense block and every expert at one width."""
    config = _config(model)
    fam = family_of(config)
    seen: dict[str, set[int]] = {}

    def add(attr: str, spec: dict) -> bool:
        seen.setdefault(attr, set()).add(spec["width"])
        return spec["kind"] != "lowrank" and not spec["scaled"]

    for i, mlp in enumerate(find_mlp_layers(model)):
        spec = layer_spec(model, i)
        if isinstance(mlp, MoEBlock):
            plain = add(fam.width_attr, spec["experts"]) and (spec["shared"] is None or add(fam.shared_width_attr, spec["shared"]))
        elif isinstance(fam, MoEFamily):  # a dense block of a MoE model (Switch: its d_ff is the experts' too)
            plain = add(fam.dense_width_attr, spec)
        else:
            plain = add(fam.width_attr, spec)
        if not plain:
            return None
    return {attr: ws.pop() for attr, ws in seen.items()} if all(len(ws) == 1 for ws in seen.values()) else None


def set_config_widths(config: PretrainedConfig, widths: dict[str, int]) -> None:
    """Write ``stock_widths``' result into a config (a stock model of those widths, for export)."""
    for attr, width in widths.items():
        setattr(config, attr, width)


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
