"""Mixture-of-Experts blocks (Mixtral, Qwen2-MoE, OLMoE) through mlp_io, the compression and the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.methods.method import Method
from src.methods.types import MLPCalibration
from src.models import mlp_io
from src.models.build import build_model
from src.pipeline.fuse import apply_spec, compress_model, count_params
from src.pipeline.settings import CompressionSettings
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import METHODS, assert_refused_before_loading

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
    assert mlp_io.layer_spec(model, layer).experts == mlp_io.MLPSpec("dense", 64)
    with pytest.raises(IndexError, match="expert 4 out of range"):
        mlp_io.read_mlp(model, layer, "4")


@pytest.mark.parametrize("name", FAMILIES)
def test_ntk_cluster_at_full_width_is_exact(compose_cfg, name: str) -> None:
    model = _model(compose_cfg, name)
    before, router = _logits(model), _router_weights(model)
    layers = [i for i in range(mlp_io.num_layers(model)) if mlp_io.is_sparse(model, i)]
    report = compress_model(model, CompressionSettings.of(_fn(compose_cfg, "ntk_cluster"), layers, 64))
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    assert mlp_io.layer_spec(model, layers[0]).experts == mlp_io.MLPSpec("fused", 64, scaled=True)
    scale = model.model.layers[layers[0]].mlp.experts.parametrizations.down_proj[0].scale
    assert scale.shape == (4, 64) and torch.equal(scale, torch.ones_like(scale)) and not scale.requires_grad
    assert not any("scale" in n for n, _ in model.named_parameters())
    assert all(torch.equal(p, _router_weights(model)[n]) for n, p in router.items()) and router
    assert {(layers[0], p) for p in mlp_io.mlp_parts(model, layers[0])} <= set(report.part_stats)


@pytest.mark.parametrize("name", FAMILIES)
def test_compressed_experts_fold_rebuild_and_keep_the_router(compose_cfg, name: str) -> None:
    model = _model(compose_cfg, name)
    router = _router_weights(model)
    layer = 1
    report = compress_model(model, CompressionSettings.of(_fn(compose_cfg, "ntk_cluster"), [layer], 16))
    assert mlp_io.intermediate_sizes(model)[layer] == 16 and report.params_after < report.params_before
    shared = 3 * 32 * (128 - 32) if name == "tiny_qwen2_moe" else 0  # the shared expert: 128 -> 32 (a quarter, as 64 -> 16)
    assert report.params_before - report.params_after == 4 * 3 * 32 * (64 - 16) + shared
    assert all(torch.equal(p, _router_weights(model)[n]) for n, p in router.items())
    ref = _logits(model)
    assert torch.isfinite(ref).all()
    # the recorded structure rebuilds on a fresh model, which then loads the weights
    fresh = _model(compose_cfg, name, seed=1)
    apply_spec(fresh, report.spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh), ref)
    # folding the counts into down_proj changes no output and leaves a stock experts module
    assert mlp_io.fold_scales(model) >= 1 and mlp_io.fold_scales(model) == 0
    torch.testing.assert_close(_logits(model), ref, atol=1e-5, rtol=1e-5)
    assert mlp_io.layer_spec(model, layer).experts.scaled is False
    assert type(model.model.layers[layer].mlp.experts) is type(model.model.layers[0 if name != "tiny_qwen2_moe" else 2].mlp.experts)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_subset_of_experts_pads_the_others(compose_cfg, name: str) -> None:
    model = _model(compose_cfg, name)
    before = {e: mlp_io.read_mlp(model, 1, str(e)) for e in range(4)}
    compress_model(model, CompressionSettings.of(_fn(compose_cfg, "prune"), [1], 16, experts=(1, 3), shared_expert=False))
    assert mlp_io.intermediate_sizes(model)[1] == 64  # the widest expert's width
    scale = model.model.layers[1].mlp.experts.parametrizations.down_proj[0].scale  # [E, k]: 0 on the padding
    assert scale.sum(1).tolist() == [64, 16, 64, 16]
    for e in (0, 2):
        torch.testing.assert_close(mlp_io.read_mlp(model, 1, str(e)).down, before[e].down)
    assert torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_train_shrinks_and_logs_fusion_metrics(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"model={name}", "task=rt_review", "ffn_mode=ntk_cluster", "approx_metrics.probe_size=4", "test=false"])
    metrics = train(cfg)
    res = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert (res["layers"], res["mid_dim"]) == ([1, 2], 16)  # the top two thirds; a quarter of an expert
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"]
    for key in ("fusion/ntk_sign_rel_err", "fusion/ntk_std_rel_err", "fusion/output_rel_err/layer_2", "fusion/hidden_rel_err",
                "fusion/inertia/layer_1/expert_3"):
        assert 0 <= metrics[key] < 100, key
    import pandas as pd

    df = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    assert {"fusion/ntk_sign_rel_err/layer_1", "fusion/params_after", "fusion/inertia/layer_2/expert_0"} <= set(df.columns)
    # each probe token goes to its top-2 experts
    counts = [metrics[f"fusion/router_tokens/layer_1/expert_{e}"] for e in range(4)]
    assert sum(counts) % 2 == 0 and sum(counts) > 0


def test_resume_rebuilds_the_compressed_experts(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    over = ["model=tiny_qwen2_moe", "task=rt_review", "ffn_mode=ntk_cluster", "ffn_mode.experts=[0,2]", "approx_metrics.enabled=false",
            "trainer.max_steps=-1", "test=false"]
    train(compose_cfg(over))  # one epoch: 32 samples / batch 8 = 4 steps
    import src.callbacks.fusion as fusion

    monkeypatch.setattr(fusion, "compress_model", lambda *a, **k: pytest.fail("resume must not compress again"))
    cfg2 = compose_cfg([*over, "trainer.max_epochs=2", "ckpt_path=last"])
    train(cfg2)
    ckpt = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["fusion"]["experts"] == [0, 2] and ckpt["fusion"]["shared_expert"] is True
    spec = ckpt["fusion"]["layer_specs"]["1"]
    assert spec["experts"] == {"kind": "fused", "width": 64, "scaled": True, "rank": None} and spec["shared"]["width"] == 32
    assert any(k.endswith("experts.parametrizations.down_proj.0.scale") for k in ckpt["state_dict"])
    with pytest.raises(ConfigError, match="compressed with ffn_mode=ntk_cluster"):
        train(compose_cfg([*over[:3], "ffn_mode.experts=all", "ckpt_path=last"]))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_one_moe_layer(compose_cfg, method: str) -> None:
    model = _model(compose_cfg, "tiny_qwen2_moe")
    router, fn = _router_weights(model), _fn(compose_cfg, method)
    before = count_params(model)
    results = {}
    for part in mlp_io.mlp_parts(model, 1):
        w = mlp_io.read_mlp(model, 1, part)
        extra = {}
        if Method.of(fn).needs_calibration:  # wanda_sp: the part's activations on random inputs (its outputs are not read)
            x = torch.randn(40, w.hidden_size, generator=torch.Generator().manual_seed(0))
            extra["calib"] = MLPCalibration(x=x, y=torch.zeros_like(x))
        results[part] = fn(w, w.width // 4, seed=0, **extra)
    mlp_io.write_parts(model, 1, results)
    assert count_params(model) < before and torch.isfinite(_logits(model)).all()
    assert all(torch.equal(p, _router_weights(model)[n]) for n, p in router.items())
    spec = mlp_io.layer_spec(model, 1)
    assert spec.experts.kind == ("lowrank" if method == "svd" else "fused") and spec.shared.kind in ("fused", "lowrank")
    fresh = _model(compose_cfg, "tiny_qwen2_moe", seed=1)
    mlp_io.build_from_spec(fresh, 1, spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh), _logits(model))


@pytest.mark.parametrize("name", FAMILIES)
def test_routed_tokens_are_the_routers_choice(compose_cfg, name: str) -> None:
    model = _model(compose_cfg, name)
    x = torch.randn(50, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    masks = mlp_io.routed_tokens(model, 1, x)
    routed = torch.stack([masks[str(e)] for e in range(mlp_io.num_experts(model.config))], 1)  # [T, E]
    assert (routed.sum(1) == model.config.num_experts_per_tok).all()  # every token reaches its top-k experts, no more
    assert masks.get(mlp_io.SHARED, torch.ones(50, dtype=torch.bool)).all()


@pytest.mark.parametrize(("name", "method"), [("tiny_mixtral", "wanda_sp"), ("tiny_qwen2_moe", "ntk_cluster"), ("tiny_olmoe", "ntk_keep")])
def test_calibrated_compression_of_experts(compose_cfg, name: str, method: str) -> None:
    """Each expert calibrated on the tokens its router sends it; the refit never raises its error."""
    cfg = compose_cfg([f"model={name}", "task=rt_review", f"ffn_mode={method}", "ffn_mode.refit=lstsq", "ffn_mode.calib.size=16"])
    metrics = train(cfg)
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"] and "test/ppl" in metrics
    errs = {k: v for k, v in metrics.items() if k.startswith("fusion/calib_err/layer_")}
    assert errs and all(0 <= v < 1 for v in errs.values()), errs


MOE_CASES = {  # name: (overrides, part of the message)
    "expert_out_of_range": (["model=tiny_mixtral", "ffn_mode.experts=[1,4]"], "ffn_mode.experts has [4] out of range: model=tiny_mixtral has experts 0..3"),
    "experts_repeated": (["model=tiny_mixtral", "ffn_mode.experts=[1,1]"], "ffn_mode.experts=[1, 1] repeats an expert"),
    "experts_not_a_list": (["model=tiny_olmoe", "ffn_mode.experts=some"], "ffn_mode.experts='some' must be all or a non-empty list of expert ids"),
    "block_without_experts": (["model=tiny_qwen2_moe", "ffn_mode.layers=[0,2]"],
        "ffn_mode.layers has [0], blocks without experts: model=tiny_qwen2_moe holds experts in blocks [1, 2]"),
    "experts_on_a_dense_model": (["model=tiny_llama", "ffn_mode.experts=[0]"],
        "ffn_mode.experts=[0] applies to Mixture-of-Experts models, but model=tiny_llama is dense"),
    "shared_expert_not_bool": (["model=tiny_qwen2_moe", "ffn_mode.shared_expert=2"], "ffn_mode.shared_expert=2 must be true or false"),
    "budget_on_experts": (["model=tiny_mixtral", "ffn_mode.budget=0.5"],
        "ffn_mode.budget=0.5 allocates per-layer widths, but model=tiny_mixtral is a Mixture-of-Experts"),
    "expert_width": (["model=tiny_olmoe", "ffn_mode.mid_dim=64"], "ffn_mode.mid_dim=64 is out of range: the model's MLPs have width 64"),
}


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_settings_are_refused_before_loading(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    overrides, message = MOE_CASES[name]
    assert_refused_before_loading(compose_cfg, monkeypatch, ["task=rt_review", *overrides], message)


@pytest.mark.parametrize("name", ["mixtral_8x7b", "qwen2_moe_a2_7b", "olmoe_1b_7b"])
def test_hub_moe_models_fail_fast_offline(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import src.models.source

    monkeypatch.setattr(src.models.source, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match=f"model '{name}' .* must be downloaded from the Hugging Face Hub"):
        train(compose_cfg([f"model={name}", "task=rt_review"]))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_with_plain_from_pretrained(compose_cfg, tmp_path: Path, name: str) -> None:
    """The causal LMs; Switch Transformers and T5: tests/unit/modules/test_seq2seq.py::test_export_reproduces_the_logits."""
    from transformers import AutoModelForCausalLM

    from src.export.__main__ import export
    from src.modules.causal_lm import CausalLMModule

    layers = "[1,2]" if name == "tiny_qwen2_moe" else "[0,1,2]"  # every block that holds experts
    cfg = compose_cfg([f"model={name}", "task=rt_review", "ffn_mode=ntk_cluster", f"ffn_mode.layers={layers}",
                       "approx_metrics.enabled=false", "trainer.max_steps=2", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = export(str(ckpt), str(tmp_path / "export"), fmt="hf")
    config = json.loads((out / "config.json").read_text())
    assert config.get("moe_intermediate_size", config["intermediate_size"]) == 16 and "mlp_fusion" not in config
    if name == "tiny_qwen2_moe":
        assert config["shared_expert_intermediate_size"] == 32 and config["intermediate_size"] == 128
    c = torch.load(ckpt, weights_only=True)
    ref = CausalLMModule(c["hyper_parameters"]["model"], c["hyper_parameters"]["task"], c["hyper_parameters"]["optim"])
    apply_spec(ref.model, c["fusion"])
    ref.load_state_dict(c["state_dict"])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(loaded), _logits(ref.model.eval()), rtol=1e-5, atol=1e-5)
