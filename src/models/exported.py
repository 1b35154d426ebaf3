"""Hugging Face folders of compressed models: write (with scales folded) and load back.

When every layer's MLP is a plain MLP of one common width, the folder is a stock transformers
model with that ``intermediate_size`` and loads with ``AutoModelFor*.from_pretrained``. Otherwise
``config.json`` also records the per-layer structure under ``mlp_fusion`` and
:func:`load_exported` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from src.models import mlp_io
from src.models.fuse import apply_spec

def uniform_width(model: nn.Module) -> int | None:
    """The common width if every layer is a plain (Linear or Conv1D) MLP of one width, else None."""
    specs = [mlp_io.layer_spec(model, i) for i in range(mlp_io.num_layers(model))]
    widths = {s["width"] for s in specs}
    return widths.pop() if len(widths) == 1 and all(s["kind"] != "lowrank" and not s["scaled"] for s in specs) else None


def prepare_for_export(model: PreTrainedModel) -> None:
    """Fold count scales into the down projections (exact) and describe the structure in the config."""
    mlp_io.fold_scales(model)
    width = uniform_width(model)
    if width is not None:
        mlp_io.set_config_width(model.config, width)
        if hasattr(model.config, "mlp_fusion"):
            del model.config.mlp_fusion
    else:
        model.config.mlp_fusion = {"layer_specs": {str(i): mlp_io.layer_spec(model, i) for i in range(mlp_io.num_layers(model))}}


def load_exported(folder: str | Path, auto_cls: type) -> PreTrainedModel:
    """Load a folder written by ``src.export``; non-uniform structures are rebuilt from ``mlp_fusion``."""
    config = AutoConfig.from_pretrained(folder)
    spec = getattr(config, "mlp_fusion", None)
    if spec is None:
        return auto_cls.from_pretrained(folder)
    model = auto_cls.from_config(config)
    apply_spec(model, spec)
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied output embeddings are stored once
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the recorded structure (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()
