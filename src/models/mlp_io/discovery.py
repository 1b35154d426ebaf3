"""Which row of the table a model belongs to, and where its MLPs are: from the config alone (before
anything loads) or in a built model.

A model type in the table is read by its row. An unknown model type falls back to the module
structure: its skeleton is built on the meta device (no memory, no weights) and matched against the
table's dense layouts; exactly one match is used (with a warning: the architecture is untested),
none or several are refused.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .dense import DenseMLP
from .experts import LAYOUTS, MoEBlock
from .families import FAMILIES, SUPPORTED, Family, has
from .families import LAYOUTS as DENSE_LAYOUTS

log = logging.getLogger(__name__)

AnyLayer = DenseMLP | MoEBlock
ACT_ATTRS = ("hidden_act", "hidden_activation", "activation_function", "activation", "dense_act_fn")
WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "hidden_dim")


@dataclass(frozen=True)
class ModelShape:
    """What the compression settings need of a model, read from its config before any weights load (``model_shape``)."""

    stacks: tuple[range, ...]  # each stack's layer indices: one, or an encoder-decoder model's encoder, then decoder
    width: int  # the MLP intermediate size (a routed expert's in a Mixture-of-Experts model)
    sparse: tuple[int, ...] = ()  # the blocks that hold experts
    experts: int = 0  # routed experts per sparse block (0: a dense model)

    @property
    def num_layers(self) -> int:
        return sum(len(s) for s in self.stacks)

    def top_layers(self, fraction: float) -> list[int]:
        """The top ``fraction`` of each stack's layers (the paper's 4..11 of 12); in a Mixture-of-Experts model those of
        them that hold experts (all of those where none of the top ones does)."""
        top = [i for s in self.stacks for i in s[len(s) - max(1, round(fraction * len(s))):]]
        return ([i for i in top if i in self.sparse] or list(self.sparse)) if self.sparse else top


def family_of(config: PretrainedConfig) -> Family:
    """The table row of a config (an unknown model type: the structural fallback); ValueError if unsupported."""
    row = FAMILIES.get(config.model_type)
    return row if row is not None else _structural(config.model_type, config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=16)
def _structural(model_type: str, config_json: str) -> Family:
    how = ("add a row for it to src/models/mlp_io/families.py (where its MLPs are, their projections, the activation "
           "and width attributes) and a tiny config conf/model/tiny_<name>.yaml")
    d = json.loads(config_json)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001  (any failure to build means we cannot read it)
        raise ValueError(f"model_type {model_type!r} is not in the table, and its module structure could not be built ({e}); {how}; "
                         f"supported: {SUPPORTED}") from None
    matches = {layout.name: layout for layout in DENSE_LAYOUTS if any(layout.matches(m) for _, m in skeleton.named_modules())}
    act = next((a for a in ACT_ATTRS if isinstance(getattr(config, a, None), str)), None)
    width = next((a for a in WIDTH_ATTRS if getattr(config, a, None)), None)
    if len(matches) != 1 or act is None or width is None:
        what = "no known MLP layout" if not matches else f"ambiguous MLP layouts {sorted(matches)}" if len(matches) > 1 else "no activation or width attribute"
        raise ValueError(f"model_type {model_type!r} is not in the table and its module structure shows {what}; {how}; supported: {SUPPORTED}")
    (layout,) = matches.values()
    log.warning("model_type %r is not in the table: its MLPs match the %s layout (activation config.%s, width config.%s), "
                "read as such; this architecture is untested", model_type, layout.name, act, width)
    return Family(model_type, layout, act_attrs=(act,), width_attr=width)


def config_width(config: PretrainedConfig) -> int:
    """The pretrained MLP intermediate size a config describes (GPT-2: ``n_inner=None`` means 4h; MoE: one routed expert's)."""
    fam = family_of(config)
    return getattr(config, fam.experts.width_attr if fam.experts else fam.width_attr) or 4 * config.hidden_size


def dense_width(config: PretrainedConfig) -> int:
    """The pretrained width of the dense blocks' MLPs (a MoE model's dense blocks too)."""
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


def mlp_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(number of transformer blocks, MLP intermediate size) from a config alone, before weights load."""
    return num_blocks(config), config_width(config)


def sparse_layers(config: PretrainedConfig) -> list[int]:
    """The blocks whose MLP holds experts (empty for a dense model)."""
    fam = family_of(config)
    return fam.experts.sparse(config) if fam.experts else []


def num_experts(config: PretrainedConfig) -> int:
    """Routed experts per sparse block (0 for a dense model)."""
    fam = family_of(config)
    return int(getattr(config, fam.experts.num_attr)) if fam.experts else 0


def model_shape(config: PretrainedConfig) -> ModelShape:
    """What the compression settings need of a model (its stacks, MLP width, sparse blocks, experts), from its config alone."""
    return ModelShape(tuple(stacks(config)), config_width(config), tuple(sparse_layers(config)), num_experts(config))


def mlp_param_count(config: PretrainedConfig) -> int:
    """Parameters of one pretrained MLP of a config: 3hd gated (no biases), else 2hd + d + h; a sparse
    block: every routed expert and the shared expert."""
    fam, h, d = family_of(config), config.hidden_size, config_width(config)
    if fam.experts:
        ex = fam.experts
        shared = ex.shared_width(config) if ex.shared_width else 0
        per_neuron = 2 * h if ex.layout == "modules" and not fam.mlp.gated else 3 * h  # Switch: wi, wo
        biases = (2 * d + h) * num_experts(config) if ex.bias else 0  # gpt-oss: gate, up and down biases
        return (per_neuron * d) * num_experts(config) + biases + 3 * h * shared
    return 3 * h * d if fam.layout(config).gated else 2 * h * d + d + h


def config_of(model: nn.Module) -> PretrainedConfig:
    """The config of the model itself or, for a wrapper (a LightningModule), of the first Hugging Face model inside."""
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m.config
    raise ValueError(f"{type(model).__name__} contains no transformers PreTrainedModel")


# the attribute that keeps a model's MLPs as last found (every mlp_io call asks for them): on the model itself, so
# that they go with it (a table beside it would keep its modules alive for one more garbage collection)
FOUND = "_mlp_io_layers"


class _Found(list):
    """A model's MLPs as last found. A copy or a pickle of the model carries an empty one: the copy finds its own
    (and a table row's lambdas are never pickled)."""

    def __reduce__(self) -> tuple:
        return _Found, ()


def find_mlp_layers(model: nn.Module) -> list[AnyLayer]:
    """The transformer blocks' MLPs in layer order; ValueError for an unsupported architecture.

    Found once per model: the walk of the module tree is repeated only where an MLP's own module no longer sits
    at its path (replaced, or wrapped by a strategy); one whose projections were swapped is the same MLP, whose
    projections every read looks up anew."""
    found = model.__dict__.get(FOUND)
    if not found or not all(_in_place(model, mlp) for mlp in found):
        found = _Found(_discover(model))
        object.__setattr__(model, FOUND, found)  # a plain attribute: no submodule, parameter or buffer of the model
    return list(found)


def _in_place(model: nn.Module, mlp: AnyLayer) -> bool:
    try:
        return model.get_submodule(mlp.path) is mlp.root
    except AttributeError:
        return False


def _discover(model: nn.Module) -> list[AnyLayer]:
    """Walk the module tree for the MLPs of the model's table row."""
    config = config_of(model)
    fam = family_of(config)
    if fam.experts:
        return _moe_blocks(model, fam, config)
    layout = fam.layout(config)
    act = fam.activation(config)
    layers = [DenseMLP(layout, act, name, m) for name, m in model.named_modules() if layout.matches(m)]
    if len(layers) != num_blocks(config):
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected {num_blocks(config)} MLPs of the "
                         f"{layout.name} layout (model_type {config.model_type!r}), found {[m.path for m in layers]}")
    return layers


def _moe_blocks(model: nn.Module, fam: Family, config: PretrainedConfig) -> list[AnyLayer]:
    """Every block's MLP (``...layers.<i>.mlp``; Switch: ``encoder.block.<i>.layer.<j>.mlp``, then the
    decoder's) in layer order: sparse ones as the row's experts layout, dense ones as dense MLPs."""
    ex = fam.experts
    pattern = re.compile(rf"(^|\.){ex.block_re}$")
    block_cls = LAYOUTS[ex.layout]
    act = fam.activation(config)
    sparse = set(ex.sparse(config))
    found: list[AnyLayer] = []
    for name, m in model.named_modules():
        if pattern.search(name):
            if len(found) in sparse and not all(has(m, p) for p in (ex.path, ex.router)):
                raise ValueError(f"{name} should hold experts ({ex.path}) and a router ({ex.router}) by its config, and does not")
            found.append(block_cls(fam, config, name, m) if len(found) in sparse else DenseMLP(fam.mlp, act, name, m))
    if len(found) != num_blocks(config):
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected {num_blocks(config)} "
                         f"block MLPs matching {ex.block_re!r}, found {[b.path for b in found]}")
    return found

