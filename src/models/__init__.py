"""Architecture adapters: read and write the transformer MLPs of Hugging Face models."""

from src.models.mlp_io import (
    build_from_spec,
    check_supported,
    find_mlp_layers,
    fold_scales,
    intermediate_sizes,
    layer_spec,
    mlp_forward,
    mlp_input_module,
    mlp_modules,
    mlp_param_names,
    num_layers,
    read_mlp,
    reinit_mlp,
    write_mlp,
)
from src.models.modules import LowRankLinear, ScaledLinear

__all__ = [
    "LowRankLinear",
    "ScaledLinear",
    "build_from_spec",
    "check_supported",
    "find_mlp_layers",
    "fold_scales",
    "intermediate_sizes",
    "layer_spec",
    "mlp_forward",
    "mlp_input_module",
    "mlp_modules",
    "mlp_param_names",
    "num_layers",
    "read_mlp",
    "reinit_mlp",
    "write_mlp",
]
