"""Mixture-of-Experts blocks (Mixtral, Qwen2-MoE, OLMoE) through mlp_io, the compression and the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.compress.types import FusedMLP, MLPCalibration, MLPWeights
from src.models import mlp_io
from src.models.build import build_model
from src.models.fuse import apply_spec, compress_model, count_params
from src.models.layers import ExpertScale
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import METHODS

FAMILIES = ["tiny_mixtral", "tiny_qwen2_moe", "tiny_olmoe"]
IDS = torch.randint(1, 30000, (2, 9), generator=torch.Generator().manual_seed(1))


def _model(compose_cfg, name: str, seed: int = 0) -> nn.Module:
    cfg = compose_cfg([f"model={name}"])
    torch.manual_seed(seed)
    return build_model(cfg.model, "generation").eval()


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def _router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}


def _fn(compose_cfg, method: str):
    return instantiate(compose_cfg([f"ffn_mode={method}"]).ffn_mode.compress)


@pytest.mark.parametrize("name", FAMILIES)
def test_layout_reads_every_expert(compose_cfg, name: str) -> None:
    model = _model(compose_cfg, name)
    sparse = [i for i in range(mlp_io.num_layers(model)) if mlp_io.is_sparse(model, i)]
    assert sparse == ([1, 2] if name == "tiny_qwen2_moe" else [0, 1, 2])
    layer = sparse[0]
    parts = mlp_io.mlp_parts(model, layer)
    assert parts == ["0", "1", "2", "3"] + (["shared"] if name == "tiny_qwen2_moe" else [])
    w = mlp_io.read_mlp(model, layer, "2")
    assert (w.width, w.hidden_size, w.is_gated, w.activation) == (64, 32, True, "silu")
    ex = model.model.layers[layer].mlp.experts
    torch.testing.assert_close(w.gate, ex.gate_up_proj[2, :64])
    torch.testing.assert_close(w.down, ex.down_proj[2])
    # writing every part back as it is read changes nothing
    before = _logits(model)
    mlp_io.write_parts(model, layer, {p: mlp_io.read_mlp(model, layer, p) for p in parts})
    assert torch.equal(_logits(model), before)
    assert mlp_io.layer_spec(model, layer)["experts"] == {"kind": "dense", "width": 64, "scaled": False, "rank": None}
    with pytest.raises(IndexError, match="expert 4 out of range"):
        mlp_io.read_mlp(model, layer, "4")
