"""Encoder-decoder models (T5, Switch Transformers) through mlp_io, and the seq2seq task kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.models import mlp_io
from src.models.build import build_model
from src.modules.seq2seq import classification_scores
from src.pipeline.fuse import apply_spec, compress_model
from src.pipeline.settings import CompressionSettings
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import FAST, assert_refused_before_loading, run_cli

IDS = torch.randint(1, 30000, (2, 9), generator=torch.Generator().manual_seed(1))
DEC = torch.randint(1, 30000, (2, 5), generator=torch.Generator().manual_seed(2))
SPARSE = [1, 3]  # tiny_switch: encoder block 1 and decoder block 1 hold the experts


def _model(compose_cfg, name: str, seed: int = 0, *overrides: str) -> nn.Module:
    cfg = compose_cfg([f"model={name}", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg.model, "seq2seq").eval()


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, decoder_input_ids=DEC).logits


def _router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}


def _ntk_cluster(compose_cfg, layers: list[int], mid_dim: int) -> CompressionSettings:
    return CompressionSettings.of(instantiate(compose_cfg(["ffn_mode=ntk_cluster"]).ffn_mode.compress), layers, mid_dim)


def test_switch_layout(compose_cfg) -> None:
    model = _model(compose_cfg, "tiny_switch")
    assert [mlp_io.is_sparse(model, i) for i in range(4)] == [False, True, False, True]
    assert [mlp_io.in_decoder(model, i) for i in range(4)] == [False, False, True, True]
    assert mlp_io.mlp_parts(model, 3) == ["0", "1", "2", "3"] and mlp_io.mlp_parts(model, 0) == [None]
    w = mlp_io.read_mlp(model, 3, "2")
    assert (w.width, w.hidden_size, w.is_gated, w.activation, w.up_bias) == (64, 32, False, "relu", None)
    torch.testing.assert_close(w.up, model.decoder.block[1].layer[2].mlp.experts["expert_2"].wi.weight)
    assert mlp_io.layer_spec(model, 1).experts == mlp_io.MLPSpec("dense", 64)
    assert mlp_io.router_counts(model, 1, torch.randn(7, 32)).sum() == 7  # top-1: each token once


def test_switch_ntk_cluster_exact_fold_rebuild_router(compose_cfg) -> None:
    model = _model(compose_cfg, "tiny_switch")
    before, router = _logits(model), _router_weights(model)
    compress_model(model, _ntk_cluster(compose_cfg, SPARSE, 64))
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)  # k = d: every sub-MLP its own cluster
    report = compress_model(model, _ntk_cluster(compose_cfg, SPARSE, 16))
    assert report.params_before - report.params_after == 2 * 4 * 2 * 32 * (64 - 16)  # 2 blocks x 4 experts x (wi + wo)
    assert mlp_io.layer_spec(model, 3).experts == mlp_io.MLPSpec("fused", 16, scaled=True)
    scale = model.encoder.block[1].layer[1].mlp.experts["expert_0"].wo.scale  # a row of the block's [E, k] counts
    assert scale.shape == (16,) and scale.sum() == 64 and not any("scale" in n for n, _ in model.named_parameters())
    assert router and all(torch.equal(p, _router_weights(model)[n]) for n, p in router.items())
    ref = _logits(model)
    fresh = _model(compose_cfg, "tiny_switch", 1)
    apply_spec(fresh, report.spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh), ref)
    assert mlp_io.fold_scales(model) == 8 and mlp_io.fold_scales(model) == 0
    torch.testing.assert_close(_logits(model), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_t5_dense_mlps(compose_cfg, ffn: str) -> None:
    model = _model(compose_cfg, "tiny_t5", 0, f"model.config.feed_forward_proj={ffn}")
    assert mlp_io.read_mlp(model, 2).is_gated == (ffn != "relu")
    before = _logits(model)
    compress_model(model, _ntk_cluster(compose_cfg, [0, 1, 2, 3], 64))
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=1e-5)
    report = compress_model(model, _ntk_cluster(compose_cfg, [1, 3], 16))
    assert report.params_after < report.params_before and mlp_io.intermediate_sizes(model) == [64, 16, 64, 16]
    assert torch.isfinite(_logits(model)).all()


def test_train_switch_rt_polarity(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_switch", "task=rt_polarity", "ffn_mode=ntk_cluster", "trainer.max_steps=5", "approx_metrics.probe_size=4"])
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    res = json.loads((out / "results.json").read_text())
    assert (res["layers"], res["mid_dim"]) == (SPARSE, 16)
    # the run's kind is seq2seq, recorded in the checkpoint; the config's own task stays the classification task composed
    hp = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["task"]["kind"] == "seq2seq" and cfg.task.kind == "classification"
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"]
    for key in ("fusion/ntk_sign_rel_err", "fusion/output_rel_err/layer_3", "fusion/hidden_rel_err", "fusion/inertia/layer_1/expert_2"):
        assert 0 <= metrics[key] < 100, key
    assert sum(metrics[f"fusion/router_tokens/layer_3/expert_{e}"] for e in range(4)) > 0
    assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["best/val/acc"] <= 1 and "test/ppl" in metrics
    rows = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "generations" / "test.jsonl").read_text().splitlines()]
    assert rows[0]["source"].startswith("rt_polarity text: ") and rows[0]["references"][0] in ("rotten", "fresh")


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_cli_switch_rt_polarity(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli("src.train", "model=tiny_switch", "task=rt_polarity", "ffn_mode=ntk_cluster", *FAST, "trainer.max_steps=5",
                   "approx_metrics.probe_size=4", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and "test/acc" in results["metrics"]
    assert results["metrics"]["fusion/params_after"] < results["metrics"]["fusion/params_before"]


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_generation_task_and_distillation_on_t5(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_t5", "task=rt_review", "ffn_mode=ntk_cluster", "distill=hidden_mse", "distill.max_steps=2",
                       "approx_metrics.probe_size=4", "task.max_new_tokens=8"])
    metrics = train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())["layers"] == [1, 3]  # the top two thirds of each stack
    assert {"test/bleu", "test/rouge_l", "test/ppl", "distill/loss_end"} <= set(metrics)
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"]


def test_resume_rebuilds_the_compressed_experts(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    over = ["model=tiny_switch", "task=rt_polarity", "ffn_mode=ntk_cluster", "approx_metrics.enabled=false", "trainer.max_steps=-1", "test=false"]
    train(compose_cfg(over))  # one epoch: 32 samples / batch 8 = 4 steps
    import src.callbacks.fusion as fusion

    monkeypatch.setattr(fusion, "compress_model", lambda *a, **k: pytest.fail("resume must not compress again"))
    cfg2 = compose_cfg([*over, "trainer.max_epochs=2", "ckpt_path=last"])
    train(cfg2)
    ckpt = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["fusion"]["layer_specs"]["3"]["experts"]["width"] == 16
    assert any(k.endswith("experts.expert_3.wo.scale") for k in ckpt["state_dict"])


EXPORTS = {  # case: (overrides, stock d_ff or None for load_exported)
    # one d_ff serves Switch's dense blocks and every expert: with experts in every block (sparse step 1),
    # all four compressed, the export is a stock Switch model
    "switch_every_block": (["model=tiny_switch", "model.config.num_sparse_encoder_layers=2", "model.config.num_sparse_decoder_layers=2",
                            "ffn_mode.layers=[0,1,2,3]"], 16),
    "t5_every_block": (["model=tiny_t5", "ffn_mode.layers=[0,1,2,3]"], 16),
    # the dense blocks keep d_ff=64, the experts 16: the per-layer structure is recorded; the default format=both
    # skips ONNX, which covers no encoder-decoder model
    "switch_sparse_blocks": (["model=tiny_switch", "ffn_mode.layers=[1,3]"], None),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_reproduces_the_logits(compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    from transformers import AutoModelForSeq2SeqLM

    from src.export.__main__ import export
    from src.export.exported import load_exported
    from src.modules.seq2seq import Seq2SeqModule

    overrides, d_ff = EXPORTS[case]
    cfg = compose_cfg([*overrides, "task=rt_polarity", "ffn_mode=ntk_cluster", "approx_metrics.enabled=false", "trainer.max_steps=2", "test=false"])
    train(cfg)
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ref = Seq2SeqModule(ckpt["hyper_parameters"]["model"], ckpt["hyper_parameters"]["task"], ckpt["hyper_parameters"]["optim"])
    apply_spec(ref.model, ckpt["fusion"])
    ref.load_state_dict(ckpt["state_dict"])
    if d_ff is None:
        with pytest.raises(ConfigError, match=r"^format=onnx is refused for model=tiny_switch: ONNX export covers sequence classifiers "
                           r"and causal LMs, not encoder-decoder \(seq2seq\) models; export it with format=hf\.$"):
            export(str(path), str(tmp_path / "onnx"), fmt="onnx")
        assert not (tmp_path / "onnx").exists()
    out = export(str(path), str(tmp_path / case), fmt="hf" if d_ff else "both")
    config, card = json.loads((out / "config.json").read_text()), (out / "README.md").read_text()
    if d_ff:
        assert config["d_ff"] == d_ff and "mlp_fusion" not in config
        assert f"config.json sets `d_ff={d_ff}`); load with `AutoModelForSeq2SeqLM.from_pretrained(folder)`" in card
        loaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    else:
        assert "mlp_fusion" in config and config["d_ff"] == 64
        assert "load with `src.export.exported.load_exported(folder, AutoModelForSeq2SeqLM)`, not plain `from_pretrained`" in card
        assert "- ONNX: skipped; ONNX export covers sequence classifiers and causal LMs" in card and not (out / "model.onnx").exists()
        assert json.loads((out / "export.json").read_text())["formats"] == ["hf"]
        assert "ONNX skipped: ONNX export covers" in caplog.text
        loaded = load_exported(out, AutoModelForSeq2SeqLM)
    torch.testing.assert_close(_logits(loaded), _logits(ref.model.eval()), rtol=1e-5, atol=1e-5)


def test_classification_scores_count_unknown_words_as_wrong() -> None:
    s = classification_scores(["fresh", "Rotten", "maybe", "fresh"], ["fresh", "rotten", "rotten", "rotten"], ["rotten", "fresh"],
                              ["acc", "f1", "combined_score"])
    assert s["acc"] == 0.5 and s["invalid"] == 0.25 and s["combined_score"] == (s["acc"] + s["f1"]) / 2


CASES = {  # overrides: part of the message
    "block_without_experts": (["model=tiny_switch", "ffn_mode.layers=[0,1]"],
        "ffn_mode.layers has [0], blocks without experts: model=tiny_switch holds experts in blocks [1, 3]"),
    "expert_out_of_range": (["model=tiny_switch", "ffn_mode.experts=[4]"], "ffn_mode.experts has [4] out of range: model=tiny_switch has experts 0..3"),
    "layer_out_of_range": (["model=tiny_t5", "ffn_mode.layers=[4]"], "ffn_mode.layers has [4] out of range: the model has layers 0..3"),
    "regression_task": (["model=tiny_t5", "task=stsb", "task.data_dir=/"], "task=stsb is a regression task"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_settings_are_refused_before_loading(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    overrides, message = CASES[name]
    assert_refused_before_loading(compose_cfg, monkeypatch, ["task=rt_polarity", *overrides], message)


@pytest.mark.parametrize("name", ["switch_base_16", "t5_base"])
def test_hub_models_fail_fast_offline(compose_cfg, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import src.models.source

    monkeypatch.setattr(src.models.source, "hub_reachable", lambda: False)
    with pytest.raises(ConfigError, match=f"model '{name}' .* must be downloaded from the Hugging Face Hub"):
        train(compose_cfg([f"model={name}", "task=rt_polarity"]))
