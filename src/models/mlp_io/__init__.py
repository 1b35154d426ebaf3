"""The one place that reads and writes each architecture's transformer MLPs and experts and knows their widths.

- ``families``: the table, one row per ``config.model_type`` (layouts, attributes, sparse blocks);
- ``discovery``: a config's row (the module structure only as a fallback) and where a model's MLPs are;
- ``dense`` / ``experts``: the layout classes that read and write a dense MLP and a sparse block's experts;
- ``projections``: projection modules of any kind;
- ``spec``: a layer's structure as typed records (``MLPSpec``, ``MoESpec``), as plain data where it is written down;
- ``layers``: the layer-level functions below, which the rest of the project calls.

Encoder-decoder models (T5, Switch Transformers) number their blocks encoder first, then decoder.
"""

from .discovery import ModelShape, config_width, family_of, find_mlp_layers, mlp_param_count, mlp_shape, model_shape, num_experts, sparse_layers
from .experts import SHARED
from .families import FAMILIES
from .layers import (
    block_module,
    build_from_spec,
    fold_scales,
    fused_expert_weights,
    in_decoder,
    intermediate_sizes,
    is_sparse,
    layer_spec,
    mlp_forward,
    mlp_input_module,
    mlp_modules,
    mlp_param_names,
    mlp_parts,
    num_layers,
    read_mlp,
    reinit_mlp,
    routed_tokens,
    router_counts,
    set_config_widths,
    stock_widths,
    vmappable,
    write_mlp,
    write_parts,
)
from .spec import LayerSpec, MLPSpec, MoESpec, spec_from_dict

__all__ = [
    "FAMILIES", "SHARED", "LayerSpec", "MLPSpec", "ModelShape", "MoESpec", "block_module", "build_from_spec", "config_width", "family_of",
    "find_mlp_layers", "fold_scales", "fused_expert_weights", "in_decoder", "intermediate_sizes", "is_sparse", "layer_spec", "mlp_forward",
    "mlp_input_module", "mlp_modules", "mlp_param_count", "mlp_param_names", "mlp_parts", "mlp_shape", "model_shape", "num_experts", "num_layers",
    "read_mlp", "reinit_mlp", "routed_tokens", "router_counts", "set_config_widths", "sparse_layers", "spec_from_dict", "stock_widths", "vmappable",
    "write_mlp", "write_parts",
]
