"""The table of MLP families: one row per ``config.model_type``.

A row says where a model's MLPs (and, in a Mixture-of-Experts model, its experts) are, what their
projections are called, which config attribute names the activation and holds each width, which
blocks hold experts, and which layout class reads and writes them (``dense.DenseMLP``,
``experts.FusedExperts`` or ``experts.ModuleExperts``). Adding an architecture is one row here plus
one tiny config (``conf/model/tiny_<name>.yaml``, named in the row) that the shared family tests build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from src.methods.common import clamped_swiglu


@dataclass(frozen=True)
class DenseLayout:
    """Where one dense MLP layout keeps its pieces; paths are relative to the MLP's root module."""

    name: str
    up: str  # [d, h]; with ``gate_up`` set: unused
    down: str  # [h, d]
    act: str  # the activation module
    input: str = ""  # module whose first positional input is the MLP input ("" = the root itself)
    gate: str | None = None  # [d, h], gated MLPs: act(gate x) * (up x)
    gate_up: str | None = None  # one Linear [2d, h] holding the gate rows, then the up rows (Phi-3)
    conv1d: bool = False  # native projections are transformers Conv1D (weight [in, out])
    residual_init: bool = False  # down projection initialised with std / sqrt(2 n_layer) (GPT-2)

    @property
    def gated(self) -> bool:
        return bool(self.gate or self.gate_up)

    def modules(self) -> dict[str, str]:
        """{name: path} of the projection modules as they exist: "gate", "up", "down", or "gate_up", "down"."""
        if self.gate_up:
            return {"gate_up": self.gate_up, "down": self.down}
        return {r: p for r, p in (("gate", self.gate), ("up", self.up), ("down", self.down)) if p}

    def matches(self, module) -> bool:
        """Whether ``module`` is the root of an MLP of this layout (holds every projection and the activation)."""
        return all(has(module, p) for p in (*self.modules().values(), self.act))


def has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def all_blocks(config: PretrainedConfig) -> list[int]:
    return list(range(config.num_hidden_layers))


def qwen_sparse(config: PretrainedConfig) -> list[int]:
    """Qwen2/3-MoE: dense blocks are ``mlp_only_layers`` and those off the ``decoder_sparse_step``."""
    dense, step = set(config.mlp_only_layers or []), config.decoder_sparse_step
    return [i for i in range(config.num_hidden_layers) if i not in dense and config.num_experts > 0 and (i + 1) % step == 0]


def deepseek_sparse(config: PretrainedConfig) -> list[int]:
    """DeepSeek-V3: the first ``first_k_dense_replace`` blocks are dense, the rest hold experts."""
    return list(range(config.first_k_dense_replace, config.num_hidden_layers))


def switch_sparse(config: PretrainedConfig) -> list[int]:
    """Switch Transformers: block i of a stack is sparse when ``i % step == 1`` (every block for step 1, none for 0);
    encoder blocks are numbered first, then decoder blocks."""
    n_enc = config.num_layers
    stacks = ((range(n_enc), config.encoder_sparse_step), (range(n_enc, n_enc + config.num_decoder_layers), config.decoder_sparse_step))
    return [b for rng, step in stacks for i, b in enumerate(rng) if step > 0 and (step == 1 or i % step == 1)]


@dataclass(frozen=True)
class Experts:
    """The Mixture-of-Experts part of a row: where a sparse block keeps its router, experts and shared expert."""

    layout: str  # "fused": one module with 3-D parameters gate_up_proj [E, 2d, h], down_proj [E, h, d];
    #              "modules": a ModuleDict of dense MLPs "<prefix><e>" (Switch)
    num_attr: str  # config attribute: routed experts per sparse block
    width_attr: str  # config attribute: each routed expert's intermediate size
    sparse: Callable[[PretrainedConfig], list[int]] = all_blocks  # which blocks hold experts
    path: str = "experts"
    router: str = "gate"  # fused: a top-k router returning (logits, weights, indices [T, k]); modules: Switch's
    shared: str | None = None  # the shared expert, a dense MLP of the row's layout (None: none)
    shared_width: Callable[[PretrainedConfig], int] | None = None  # its intermediate size
    shared_width_attr: str | None = None  # the config attribute that sets it, where one does (stock export)
    block_re: str = r"layers\.\d+\.mlp"  # the end of a block's MLP name (sparse or dense), in block order
    expert_prefix: str = "expert_"  # "modules" layout: the experts' names
    # "fused" layout, as transformers' use_experts_implementation flags say: weights [E, in, out] (is_transposed),
    # gate and up columns alternating (is_concatenated=False), biases gate_up_proj_bias [E, 2d], down_proj_bias [E, h] (has_bias)
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False


@dataclass(frozen=True)
class Family:
    """One row: a model type's MLP layout, its config attributes and (MoE) its experts."""

    model_type: str
    mlp: DenseLayout | None  # dense blocks' MLPs (MoE: the dense blocks, the shared expert, a "modules" expert); None: none
    act_attrs: tuple[str, ...] = ("hidden_act",)  # config attributes naming the activation (an ACT2FN key), first set wins
    gated_form: Callable[[PretrainedConfig], str] | None = None  # the activation, where it is no ACT2FN key (common.gated_form)
    width_attr: str = "intermediate_size"  # config attribute: the dense MLPs' pretrained width (None: 4h, GPT-2)
    experts: Experts | None = None
    gated_mlp: DenseLayout | None = None  # T5: the layout where ``gated_attr`` is true
    gated_attr: str | None = None
    tiny: str | None = None  # conf/model/<tiny>.yaml: a tiny random model of this row, for the shared tests
    vmappable: bool = True  # per-sample gradients batch under torch.func.vmap (not Switch: data-dependent dispatch)

    def layout(self, config: PretrainedConfig) -> DenseLayout:
        return self.gated_mlp if self.gated_attr and getattr(config, self.gated_attr) else self.mlp

    def activation(self, config: PretrainedConfig) -> str:
        if self.gated_form:
            return self.gated_form(config)
        for attr in self.act_attrs:
            act = getattr(config, attr, None)
            if act is not None:
                if not isinstance(act, str):
                    raise ValueError(f"config.{attr} must name an activation (ACT2FN key), got {act!r}")
                return act
        raise ValueError(f"{self.model_type} config names no activation in {', '.join(self.act_attrs)}")


BERT = DenseLayout("bert", up="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn", input="intermediate")
DISTILBERT = DenseLayout("distilbert", up="lin1", down="lin2", act="activation")
GPT2 = DenseLayout("gpt2", up="c_fc", down="c_proj", act="act", conv1d=True, residual_init=True)
GATED = DenseLayout("gated", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")
GATE_UP = DenseLayout("gate_up", up="", gate_up="gate_up_proj", down="down_proj", act="activation_fn")
T5 = DenseLayout("t5", up="wi", down="wo", act="act")
T5_GATED = DenseLayout("t5_gated", gate="wi_0", up="wi_1", down="wo", act="act")
LAYOUTS = (BERT, DISTILBERT, GPT2, GATED, GATE_UP, T5, T5_GATED)

_qwen_moe = dict(layout="fused", num_attr="num_experts", width_attr="moe_intermediate_size", sparse=qwen_sparse)
ROWS = (
    *(Family(t, BERT, tiny="tiny_bert" if t == "bert" else None) for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")),
    Family("distilbert", DISTILBERT, act_attrs=("activation",), width_attr="hidden_dim", tiny="tiny_distilbert"),
    Family("gpt2", GPT2, act_attrs=("activation_function",), width_attr="n_inner", tiny="tiny_gpt2"),
    Family("llama", GATED, tiny="tiny_llama"),
    Family("mistral", GATED, tiny="tiny_mistral"),
    Family("qwen2", GATED),
    Family("qwen3", GATED, tiny="tiny_qwen3"),
    Family("olmo2", GATED, tiny="tiny_olmo2"),
    Family("gemma3_text", GATED, act_attrs=("hidden_activation",), tiny="tiny_gemma3"),
    Family("phi3", GATE_UP, tiny="tiny_phi3"),
    Family("t5", T5, act_attrs=("dense_act_fn",), width_attr="d_ff", gated_mlp=T5_GATED, gated_attr="is_gated_act", tiny="tiny_t5"),
    Family("mixtral", GATED, experts=Experts("fused", "num_local_experts", "intermediate_size"), tiny="tiny_mixtral"),
    Family("olmoe", GATED, experts=Experts("fused", "num_experts", "intermediate_size"), tiny="tiny_olmoe"),
    Family("qwen2_moe", GATED, experts=Experts(**_qwen_moe, shared="shared_expert", shared_width_attr="shared_expert_intermediate_size",
                                               shared_width=lambda c: c.shared_expert_intermediate_size), tiny="tiny_qwen2_moe"),
    Family("qwen3_moe", GATED, experts=Experts(**_qwen_moe), tiny="tiny_qwen3_moe"),
    Family("deepseek_v3", GATED, experts=Experts("fused", "n_routed_experts", "moe_intermediate_size", sparse=deepseek_sparse,
                                                 shared="shared_experts", shared_width=lambda c: c.moe_intermediate_size * c.n_shared_experts),
           tiny="tiny_deepseek_v3"),
    Family("gpt_oss", None, gated_form=lambda c: clamped_swiglu(c.swiglu_alpha, c.swiglu_limit), tiny="tiny_gpt_oss",
           experts=Experts("fused", "num_local_experts", "intermediate_size", router="router", transposed=True, interleaved=True, bias=True)),
    Family("switch_transformers", T5, act_attrs=("dense_act_fn",), width_attr="d_ff", vmappable=False, tiny="tiny_switch",
           experts=Experts("modules", "num_experts", "d_ff", sparse=switch_sparse, router="router", block_re=r"block\.\d+\.layer\.\d+\.mlp")),
)
FAMILIES: dict[str, Family] = {row.model_type: row for row in ROWS}
SUPPORTED = ", ".join(FAMILIES)
