"""Calibration-aware compression (docs/methods.md section 6): calibration hooks, refit, wanda_sp, activation
weighting, the width budget, and runs whose checkpoints have per-layer widths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from src.export.exported import load_exported
from src.methods import kmeans, ntk_keep, refit, wanda_sp
from src.methods.common import activations
from src.methods.method import Method
from src.methods.types import MLPCalibration, MLPWeights
from src.models import mlp_io
from src.pipeline import budget
from src.pipeline.calibration import Calibrator
from src.pipeline.fuse import compress_model
from src.pipeline.settings import CompressionSettings
from src.preflight import preflight
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import METHODS, compress_fn, run_cli
from tests.unit.methods.test_compress_methods import make_mlp

H, D = 16, 64


def _calib(w, n: int = 200, seed: int = 3) -> MLPCalibration:
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(seed))
    y = activations(w, x) @ w.down.T + (0 if w.down_bias is None else w.down_bias)
    return MLPCalibration(x=x, y=y)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("method", METHODS)
def test_refit_never_raises_the_calibration_error(method: str, gated: bool) -> None:
    w = make_mlp(gated=gated, act="silu", std=0.3)
    calib = _calib(w)
    fn = compress_fn(method)
    c = fn(w, 12, seed=0, **({"calib": calib} if Method.of(fn).needs_calibration else {}), **({"mmd_steps": 3} if method == "mmd" else {}))
    before, fitted = refit.rel_error(c, calib), refit.refit(c, calib)
    after = refit.rel_error(fitted, calib)
    assert after <= before + 1e-9 and fitted.stats["calib_err"] == pytest.approx(after)
    assert after < 0.999 * before, (method, before, after)  # on random weights least squares always finds better
    if method in ("ntk_cluster", "ntk_keep"):  # the frozen counts stay as they are, part of the design matrix
        assert torch.equal(fitted.scale, c.scale)


def test_refit_keeps_the_original_when_the_ridge_would_raise_the_error() -> None:
    w = make_mlp(std=0.3)
    calib = _calib(w)
    c = compress_fn("prune")(w, D - 1, seed=0)
    fitted = refit.refit(c, calib, ridge=1e6)  # a huge ridge: the solution shrinks towards 0
    assert torch.equal(fitted.weights.down, c.weights.down)


def test_wanda_sp_keeps_the_largest_activation_weighted_norms() -> None:
    w = make_mlp(std=0.3)
    calib = _calib(w)
    score = w.down.abs().sum(0) * activations(w, calib.x).norm(dim=0)
    expected = score.argsort(descending=True)[:10].sort().values
    c = wanda_sp.compress(w, 10, seed=0, calib=calib)
    torch.testing.assert_close(c.weights.up, w.up[expected])
    torch.testing.assert_close(c.weights.down, w.down[:, expected])


@pytest.mark.parametrize("method", ["wanda_sp", "ntk_keep"])
def test_the_wanda_sp_score_takes_the_l1_norm_of_the_down_column(method: str) -> None:
    """Equal activations; down columns [1, 1] (L1 2, L2 1.41) and [1.5, 0] (L1 1.5, L2 1.5): the L1
    norm, as FLAP's reference code, keeps neuron 0 where the L2 norm would keep neuron 1."""
    w = MLPWeights(up=torch.ones(3, 2), down=torch.tensor([[1.0, 1.5, 0.1], [1.0, 0.0, 0.0]]), activation="relu")
    calib = MLPCalibration(x=torch.ones(4, 2), y=torch.zeros(4, 2))  # every neuron's activation is 2 at every token
    if method == "wanda_sp":
        c = wanda_sp.compress(w, 1, seed=0, calib=calib)
    else:  # mid_dim 2, keep 0.5: one neuron kept exactly (first), the other two fused
        c = ntk_keep.compress(w, 2, seed=0, calib=calib, keep=0.5)
    torch.testing.assert_close(c.weights.down[:, 0], w.down[:, 0])


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_ntk_keep_keeps_the_top_wanda_neurons_and_fuses_the_rest(gated: bool) -> None:
    w = make_mlp(gated=gated, act="silu", std=0.3)
    calib = _calib(w)
    c = ntk_keep.compress(w, 12, seed=0, calib=calib, keep=0.5)  # 6 kept exactly, 58 fused into 6
    kept = wanda_sp.scores(w, calib).argsort(descending=True)[:6].sort().values
    torch.testing.assert_close(c.weights.up[:6], w.up[kept])
    torch.testing.assert_close(c.weights.down[:, :6], w.down[:, kept])
    assert torch.equal(c.scale[:6], torch.ones(6)) and c.scale.sum() == D  # counts: 1 each kept, cluster sizes after
    assert not c.scale.requires_grad and c.stats["kept"] == 6


def test_weighted_kmeans_centroids_are_weighted_means() -> None:
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    wts = torch.rand(40, generator=torch.Generator().manual_seed(1))
    km = kmeans.kmeans(x, 4, seed=0, weights=wts)
    for j in range(4):
        members = km.labels == j
        torch.testing.assert_close(km.centroids[j], (x[members] * wts[members, None]).sum(0) / wts[members].sum())
        assert km.counts[j] == members.sum()  # counts stay point counts


def test_activation_weighting_changes_the_clusters() -> None:
    w = make_mlp(std=0.3)
    calib = _calib(w)
    plain = compress_fn("ntk_cluster")(w, 12, seed=0)
    weighted = compress_fn("ntk_cluster")(w, 12, seed=0, weighting="activation", calib=calib)
    assert not torch.allclose(plain.weights.up, weighted.weights.up) and weighted.scale.sum() == D


def test_budget_allocation_fills_the_budget_and_favours_steep_curves() -> None:
    errors = {0: {8: 0.9, 16: 0.6, 32: 0.3, 48: 0.2}, 1: {8: 0.4, 16: 0.38, 32: 0.36, 48: 0.35}}
    widths = budget.allocate(errors, 50)
    assert sum(widths.values()) == 50 and widths[0] > widths[1]
    with pytest.raises(ValueError, match="outside"):
        budget.allocate(errors, 100)
    assert budget.candidate_widths(64, 0.25) == [4, 8, 12, 16, 24, 32, 48]


def _tiny() -> torch.nn.Module:
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=H * 2, num_hidden_layers=4, num_attention_heads=2, intermediate_size=D, vocab_size=100)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(10) < torch.randint(4, 11, (8, 1), generator=g)).long()
    return [{"input_ids": torch.randint(1, 100, (8, 10), generator=g) * mask, "attention_mask": mask}]


def test_calibrator_drops_padding_and_is_sequential() -> None:
    model = _tiny()
    cal = Calibrator(_batches(), sequential=True)
    got = cal.collect(model, [1, 3])
    assert got[1].x.shape == (int(_batches()[0]["attention_mask"].sum()), H * 2)
    torch.testing.assert_close(got[3].y, mlp_io.mlp_forward(model, 3, got[3].x))
    compress_model(model, CompressionSettings.of(compress_fn("prune"), [1], 8))
    assert not torch.allclose(cal.collect(model, [3])[3].x, got[3].x)  # layer 3's inputs follow the compressed layer 1


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_distilbert", "tiny_llama", "tiny_mixtral", "tiny_qwen2_moe", "tiny_t5"])
def test_sequential_replay_matches_a_full_forward_per_layer(compose_cfg, name: str) -> None:
    from src.models.build import build_model

    cfg = compose_cfg([f"model={name}"])
    torch.manual_seed(0)
    head = "classification" if "bert" in name else "seq2seq" if name == "tiny_t5" else "generation"
    model = build_model(cfg.model, head, **({"num_labels": 2} if head == "classification" else {})).eval()
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(10) < torch.randint(4, 11, (6, 1), generator=g)).long()
    batches = [{"input_ids": torch.randint(1, 100, (6, 10), generator=g) * mask, "attention_mask": mask} for _ in range(2)]
    if name == "tiny_t5":
        batches = [b | {"decoder_input_ids": b["input_ids"][:, :5]} for b in batches]
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    cal = Calibrator(batches)
    layers = [1, 2, 3] if mlp_io.num_layers(model) >= 4 else [1]
    for layer in layers:  # as compress_model does: collect a layer, then compress it
        got = cal.collect(model, [layer])[layer]
        before = len(calls)
        want = Calibrator(batches).collect(model, [layer])[layer]  # a fresh forward from the embeddings
        del calls[before:]
        torch.testing.assert_close(got.x, want.x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.y, want.y, rtol=1e-5, atol=1e-6)
        compress_model(model, CompressionSettings.of(compress_fn("prune"), [layer], 8))
    chain = mlp_io.block_module(model, 0) is not None
    assert chain == (name != "tiny_t5")  # an encoder-decoder model's decoder blocks also read the encoder: no replay
    assert len(calls) == len(batches) * (1 if chain else len(layers))  # one forward of the model per batch, then block replays


def test_budget_widths_sum_to_the_budget_in_a_model() -> None:
    model = _tiny()
    settings = CompressionSettings.of(compress_fn("ntk_cluster"), [1, 2, 3], 16, budget=0.25, refit="lstsq")
    report = compress_model(model, settings, calibrator=Calibrator(_batches()))
    widths = mlp_io.intermediate_sizes(model)
    assert sum(widths[1:]) == int(0.25 * 3 * D) and widths[0] == D
    assert report.spec["widths"] == {str(i): widths[i] for i in (1, 2, 3)} and report.spec["budget"] == 0.25


@pytest.mark.parametrize("overrides,message", [
    (["ffn_mode=wanda_sp", "ffn_mode.calib.size=0"], "ffn_mode.calib.size=0 is data-free, but ffn_mode=wanda_sp"),
    (["ffn_mode.refit=lstsq", "ffn_mode.calib.size=0"], "but refit=lstsq needs calibration data"),
    (["ffn_mode.refit=exact"], "ffn_mode.refit='exact' must be one of none, lstsq, bias"),
    (["ffn_mode.budget=1.5"], "ffn_mode.budget=1.5 must be a fraction"),
    (["ffn_mode.weighting=energy"], "ffn_mode.weighting='energy' must be one of ['none', 'activation']"),
    (["ffn_mode.calib.size=-1"], "ffn_mode.calib.size=-1 must be a non-negative integer"),
    (["ffn_mode=ntk_keep", "ffn_mode.keep=1.5"], "ffn_mode.keep=1.5 must be a fraction in .0, 1.: the share"),
    (["ffn_mode=ntk_keep", "ffn_mode.calib.size=0"], "ffn_mode.calib.size=0 is data-free, but ffn_mode=ntk_keep"),
])
def test_refusals(compose_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        preflight(compose_cfg(["model=tiny_bert", *overrides]))


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_budget_run_resumes_and_exports(compose_cfg, tmp_path: Path) -> None:
    over = ["model=tiny_bert", "ffn_mode=wanda_sp", "ffn_mode.budget=0.31", "ffn_mode.refit=lstsq", "ffn_mode.calib.size=16",
            "approx_metrics.probe_size=4", "trainer.max_steps=2"]
    metrics = train(compose_cfg(over))
    assert any(k.startswith("fusion/width/layer_") for k in metrics) and "fusion/calib_err/layer_3" in metrics
    run = tmp_path / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    widths = ckpt["fusion"]["widths"]
    assert sum(widths.values()) == int(0.31 * 3 * 64) == 59 and len(set(widths.values())) > 1  # 59 neurons: per-layer widths
    resumed = train(compose_cfg([*over, "trainer.max_steps=4", "ckpt_path=last"]))  # rebuilds the widths, no compression
    assert "fusion/params_after" not in resumed and resumed["test/acc"] >= 0
    out = tmp_path / "exported"
    proc = run_cli("src.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = load_exported(out, AutoModelForSequenceClassification)
    assert mlp_io.intermediate_sizes(model)[1:] == [widths[str(i)] for i in (1, 2, 3)]
    assert "mlp_fusion" in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize(("model", "hf", "method", "layers", "width", "refit"), [
    ("minilm", {"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 384, "intermediate_size": 1536}, "ntk_cluster", [2, 3, 4, 5], 384, "none"),
    ("smollm2", {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536}, "wanda_sp",
     list(range(10, 30)), 1152, "lstsq"),
])
def test_each_models_compression_defaults(compose_cfg, model: str, hf: dict, method: str, layers: list[int], width: int, refit: str) -> None:
    """The main job's paper defaults; SmolLM2's chosen from docs/study/llm/quality.md (a sixth of its MLP parameters removed)."""
    from transformers import AutoConfig

    from src.preflight import compression_settings

    cfg = compose_cfg([f"model={model}"])
    config = AutoConfig.for_model(**hf)
    s = compression_settings(cfg, config)
    assert (s.method.name, list(s.layers), s.mid_dim, s.refit) == (method, layers, width, refit)
    assert cfg.ffn_mode.layers is None and cfg.ffn_mode.mid_dim is None  # resolved in the settings, the config as composed
    per_layer = mlp_io.mlp_param_count(config)  # one MLP's parameters
    removed = len(layers) * per_layer * (1 - width / hf["intermediate_size"])
    assert removed >= per_layer * hf["num_hidden_layers"] / 6 or model == "minilm"  # SmolLM2: 13.3 M of 79.6 M
    assert compose_cfg([f"model={model}", "ffn_mode=ntk_cluster"]).ffn_mode.name == "ntk_cluster"  # the command line still chooses
