"""Compression applied to whole models: every method on every MLP family, the callback, cache, resume, export."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification

from src.methods import ntk_cluster
from src.models import mlp_io
from src.models.build import build_model
from src.pipeline.calibration import Calibrator
from src.pipeline.fuse import apply_spec, compress_model, count_params
from src.pipeline.settings import CompressionSettings
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import METHODS

TINY = {
    "tiny_bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 128},
    "tiny_gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 2, "n_inner": 64, "vocab_size": 128},
    "tiny_distilbert": {"model_type": "distilbert", "dim": 32, "n_layers": 4, "n_heads": 2, "hidden_dim": 64, "vocab_size": 128},
    "tiny_llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 128},
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model({"name": name, "config": TINY[name]}, "classification", num_labels=2, pad_token_id=0).eval()
    return m


def _fn(compose_cfg, method: str):
    cfg = compose_cfg([f"ffn_mode={method}"])
    return instantiate(cfg.ffn_mode.compress)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_family(compose_cfg, arch: str, method: str) -> None:
    model = _model(arch)
    ids = torch.randint(1, 128, (2, 7))
    settings = CompressionSettings.of(_fn(compose_cfg, method), [1, 3], 16, name=method)
    calibrator = Calibrator([{"input_ids": torch.randint(1, 128, (4, 9))}]) if settings.needs_calibration else None  # wanda_sp
    report = compress_model(model, settings, calibrator=calibrator)
    assert mlp_io.intermediate_sizes(model)[0] == 64 and report.params_after < report.params_before == count_params(_model(arch))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    if method == "ntk_cluster":  # the counts are a frozen buffer, not a parameter
        names = [n for n, _ in model.named_parameters()]
        assert not any("scale" in n for n in names) and any(n.endswith("scale") for n, _ in model.named_buffers())
    # the recorded structure rebuilds the same shapes on a fresh model, which then loads the weights
    fresh = _model(arch)
    apply_spec(fresh, report.spec)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_cache_hit_and_corruption(compose_cfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fn, cache_dir = _fn(compose_cfg, "ntk_cluster"), str(tmp_path / "c")
    settings = CompressionSettings.of(fn, [2], 16, seed=3, cache_dir=cache_dir)
    def run() -> torch.nn.Module:
        compress_model(m := _model("tiny_bert"), settings)
        return m

    first = run()
    files = list((tmp_path / "c" / "ntk_cluster").glob("*.safetensors"))  # a folder per method
    assert len(files) == 1
    m1 = _model("tiny_bert")
    rep = compress_model(m1, settings)
    assert rep.layer_stats[2]["cache_hit"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), m1.state_dict().values()))
    # another seed is another key
    rep = compress_model(_model("tiny_bert"), CompressionSettings.of(fn, [2], 16, seed=4, cache_dir=cache_dir))
    assert rep.layer_stats[2]["cache_hit"] == 0.0
    # flip bytes inside a tensor: the checksum catches it, the file is recomputed with a warning
    data = bytearray(files[0].read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    files[0].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        m2 = _model("tiny_bert")
        rep = compress_model(m2, settings)
    assert rep.layer_stats[2]["cache_hit"] == 0.0 and "corrupted" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), m2.state_dict().values()))


def test_cache_keys_stay_those_existing_caches_hold(tmp_path: Path) -> None:
    """The keys a training run's compression wrote before its settings were one object: a change in how
    keys are made would silently orphan every existing cache."""
    config = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 32}
    model = build_model({"name": "t", "config": config}, "classification", num_labels=2)
    with torch.no_grad():  # fixed weights, whatever the initialisation draws
        for i in range(2):
            for m in mlp_io.mlp_modules(model, i).values():
                m.weight.copy_(torch.linspace(-1, 1, m.weight.numel()).reshape(m.weight.shape).cos())
                m.bias.copy_(torch.linspace(0, 1, m.bias.numel()))
    fn = functools.partial(ntk_cluster.compress, n_init=3, max_iter=100, tol=1e-4, weighting="none")  # conf/ffn_mode/ntk_cluster.yaml
    compress_model(model, CompressionSettings.of(fn, [0, 1], 4, seed=7, cache_dir=str(tmp_path)), identity="random:abc")
    assert sorted(p.stem for p in (tmp_path / "ntk_cluster").iterdir()) == ["40abdbce6a40d741f275a8887ddd3fe0", "ba19f37ce080f1c9184386c6961b43c7"]


def test_settings_record_and_match_a_checkpoint(compose_cfg) -> None:
    """The checkpoint's record comes from the settings; a run resumes a record of the same method, layers,
    width, budget and experts (one without experts: a dense model's, or an older one's)."""
    s = CompressionSettings.of(_fn(compose_cfg, "ntk_keep"), [1, 2], 8, name="ntk_keep", refit="lstsq")
    assert s.variant() == {"keep": 0.5, "refit": "lstsq", "budget": None}
    assert dataclasses.replace(s, budget=0.5, allocation="flap").variant()["allocation"] == "flap"  # only with a budget
    fused = mlp_io.MLPSpec("fused", 8, scaled=True, up_bias=True, down_bias=True)
    spec = s.spec({1: 8, 2: 8}, {1: fused, 2: fused}, has_experts=False)
    assert spec == {"method": "ntk_keep", "layers": [1, 2], "mid_dim": 8, "seed": 0, "widths": {"1": 8, "2": 8}, "budget": None,
                    "allocation": "error", "refit": "lstsq", "layer_specs": {"1": fused.as_dict(), "2": fused.as_dict()}}
    assert s.matches(spec) and not dataclasses.replace(s, mid_dim=4).matches(spec) and not dataclasses.replace(s, layers=(2,)).matches(spec)
    moe = dataclasses.replace(s, experts=(0, 2))
    assert moe.matches(spec) and moe.spec({}, {}, has_experts=True)["experts"] == [0, 2]
    assert not moe.matches({**spec, "experts": "all"})


@pytest.mark.parametrize(("overrides", "layers", "kind", "positions"), [
    (["model=tiny_bert", "distill=hidden_mse"], (1, 2, 3), "classification", None),
    (["model=tiny_llama", "task=rt_review"], (1, 2, 3), "generation", 128),
    (["model=tiny_t5", "task=rt_review"], (1, 3), "seq2seq", None),  # the top two thirds of each stack
    (["model=tiny_qwen2_moe", "task=rt_review"], (1, 2), "generation", 128),  # the sparse blocks among the top ones
])
def test_preflight_resolves_beside_the_config(compose_cfg, overrides: list[str], layers: tuple[int, ...], kind: str,
                                              positions: int | None) -> None:
    """The layers and width ``ffn_mode`` leaves null, the task's kind on the model and its positions are resolved into
    what the preflight returns (the settings, the task the builders take); the run's config stays as composed."""
    from omegaconf import OmegaConf

    from src.preflight import preflight

    cfg = compose_cfg([*overrides, "trainer=cpu"])  # trainer=auto's accelerator and precision are the trainer's to fill
    composed = OmegaConf.to_yaml(cfg)
    checked = preflight(cfg)
    assert OmegaConf.to_yaml(cfg) == composed and cfg.ffn_mode.layers is None and cfg.ffn_mode.mid_dim is None
    assert (checked.compression.layers, checked.compression.mid_dim, checked.task.kind) == (layers, 16, kind)
    assert checked.task.get("model_max_positions") == positions and checked.task.name == cfg.task.name


@pytest.mark.parametrize("method", METHODS)
def test_train_every_method_tiny_bert(compose_cfg, method: str) -> None:
    cfg = compose_cfg(["model=tiny_bert", f"ffn_mode={method}", "approx_metrics.enabled=false"])
    metrics = train(cfg)
    assert metrics["fusion/params_after"] < metrics["fusion/params_before"] and "test/acc" in metrics


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_train_with_metrics_other_families(compose_cfg, arch: str) -> None:
    cfg = compose_cfg([f"model={arch}", "ffn_mode=ntk_cluster", "approx_metrics.probe_size=8"])
    metrics = train(cfg)
    for key in ("fusion/ntk_sign_rel_err", "fusion/ntk_std_rel_err", "fusion/output_rel_err/layer_3", "fusion/hidden_rel_err"):
        assert 0 <= metrics[key] < 10, key
    import pandas as pd

    df = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv")
    assert {"fusion/ntk_sign_rel_err", "fusion/ntk_sign_rel_err/layer_3", "fusion/params_after"} <= set(df.columns)


def test_resume_rebuilds_without_clustering(compose_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=ntk_cluster", "approx_metrics.enabled=false", "trainer.max_steps=-1"])
    train(cfg)  # one epoch: 32 samples / batch 8 = 4 steps
    import src.callbacks.fusion as fusion

    monkeypatch.setattr(fusion, "compress_model", lambda *a, **k: pytest.fail("resume must not compress again"))
    cfg2 = compose_cfg(["model=tiny_bert", "ffn_mode=ntk_cluster", "approx_metrics.enabled=false", "trainer.max_steps=-1", "trainer.max_epochs=2",
                        "ckpt_path=last"])
    metrics = train(cfg2)
    assert "test/acc" in metrics
    ckpt = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["fusion"]["mid_dim"] == 16  # tiny_bert's default: a quarter of 64
    # another compression, or another model, is refused before anything loads
    with pytest.raises(ConfigError, match="compressed with ffn_mode=ntk_cluster"):
        train(compose_cfg(["model=tiny_bert", "ffn_mode=svd", "ckpt_path=last"]))
    with pytest.raises(ConfigError, match="belongs to model=tiny_bert"):
        train(compose_cfg(["model=tiny_llama", "ffn_mode=ntk_cluster", "ckpt_path=last"]))


@pytest.mark.parametrize("layers,uniform", [("[0,1,2,3]", True), ("[1,3]", False)])
def test_export_round_trip(compose_cfg, tmp_path: Path, layers: str, uniform: bool) -> None:
    from src.export.__main__ import export
    from src.export.exported import load_exported

    cfg = compose_cfg(["model=tiny_bert", "ffn_mode=ntk_cluster", f"ffn_mode.layers={layers}", "approx_metrics.enabled=false", "trainer.max_steps=2"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = export(str(ckpt), str(tmp_path / "export"))
    # reference: the checkpoint's own (scaled, unfolded) model
    from src.modules.classifier import ClassificationModule

    c = torch.load(ckpt, weights_only=True)
    ref = ClassificationModule(c["hyper_parameters"]["model"], c["hyper_parameters"]["task"], c["hyper_parameters"]["optim"])
    apply_spec(ref.model, c["fusion"])
    ref.load_state_dict(c["state_dict"])
    loaded = AutoModelForSequenceClassification.from_pretrained(out) if uniform else load_exported(out, AutoModelForSequenceClassification)
    if uniform:
        assert json.loads((out / "config.json").read_text())["intermediate_size"] == 16  # tiny_bert's default: a quarter of 64
    ids = torch.randint(1, 30000, (2, 9))
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, ref.model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()
    # the ONNX model (any per-layer widths) on inputs of another batch size and length than it was traced with
    meta = json.loads((out / "export.json").read_text())
    assert meta["formats"] == ["hf", "onnx"] and meta["onnx_rel_err"] < 1e-4
    card = (out / "README.md").read_text()
    assert ("from_pretrained(folder)" if uniform else "load_exported") in card and "ntk_cluster" in card
    _assert_onnx_matches(out, ref.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})


def _assert_onnx_matches(out: Path, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(["logits"], {n: inputs[n].numpy() for n in names})[0]
    ref = model.eval()(**{n: inputs[n] for n in names}).logits.detach().numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_onnx_export_of_a_fused_causal_lm(compose_cfg, tmp_path: Path) -> None:
    from src.export.__main__ import export
    from src.modules.causal_lm import CausalLMModule

    cfg = compose_cfg(["model=tiny_llama", "task=rt_review", "ffn_mode=ntk_cluster", "ffn_mode.layers=[1,3]",
                       "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = export(str(ckpt), str(tmp_path / "export"), fmt="onnx")
    assert (out / "model.onnx").is_file() and not (out / "model.safetensors").exists()
    c = torch.load(ckpt, weights_only=True)
    ref = CausalLMModule(c["hyper_parameters"]["model"], c["hyper_parameters"]["task"], c["hyper_parameters"]["optim"])
    apply_spec(ref.model, c["fusion"])
    ref.load_state_dict(c["state_dict"])
    assert mlp_io.intermediate_sizes(ref.model) == [64, 16, 64, 16]
    ids = torch.randint(1, 30000, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    _assert_onnx_matches(out, ref.model, {"input_ids": ids, "attention_mask": mask})
    assert "no KV cache" in (out / "README.md").read_text()


@pytest.mark.slow  # a CLI run or a full train/resume/export cycle: 15-60 s
def test_a_down_bias_in_a_bias_free_llama_trains_resumes_and_exports(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bias compensation's output (FLAP) in a bias-free Llama: every layer narrowed to 16, the down projections of
    layers 1 and 3 alone with a bias. One width, so only those biases keep the export from being a stock model
    (``mlp_bias`` would give every layer's gate, up and down one). It trains, resumes from the recorded structure,
    and every export computes the checkpoint's logits: Hugging Face (through load_exported), ONNX, GGUF."""
    import gguf
    from transformers import AutoModelForCausalLM

    import src.methods.prune as prune
    from src.builders import restore_module
    from src.export.__main__ import export
    from src.export.exported import load_exported

    pruned, made = prune.compress, []

    def with_down_bias(w, mid_dim: int, *, seed: int):
        fused = pruned(w, mid_dim, seed=seed)
        made.append(0.5 + torch.rand(w.hidden_size, generator=torch.Generator().manual_seed(seed)))
        if len(made) % 2:  # layers 0 and 2 (compressed in layer order) stay bias-free
            return fused
        return dataclasses.replace(fused, weights=dataclasses.replace(fused.weights, down_bias=made[-1]))

    monkeypatch.setattr(prune, "compress", with_down_bias)
    overrides = ["model=tiny_smollm2", "task=rt_review", "ffn_mode=prune", "ffn_mode.layers=[0,1,2,3]", "ffn_mode.mid_dim=16",
                 "approx_metrics.enabled=false", "test=false"]
    train(compose_cfg([*overrides, "trainer.max_steps=2"]))  # the linear warm-up's first step has lr 0, its second not
    cfg = compose_cfg([*overrides, "trainer.max_steps=3", "ckpt_path=last"])
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]["model.model.layers.1.mlp.down_proj.bias"]
    assert len(made) == 4 and not torch.equal(trained, made[1])
    train(cfg)  # resumed: the structure rebuilt from the checkpoint's record, not compressed again
    c = torch.load(ckpt, weights_only=True)
    assert c["global_step"] == 3 and len(made) == 4
    assert [(s["width"], s["up_bias"], s["down_bias"]) for s in c["fusion"]["layer_specs"].values()] == [(16, False, False), (16, False, True)] * 2
    ref = restore_module(c).model.eval()
    ids = torch.randint(1, 49152, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0

    out = export(str(ckpt), str(tmp_path / "both"))
    config = json.loads((out / "config.json").read_text())
    assert not config.get("mlp_bias") and [s["down_bias"] for s in config["mlp_fusion"]["layer_specs"].values()] == [False, True, False, True]
    loaded = load_exported(out, AutoModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-6)
    assert "biases the stock model lacks" in (out / "README.md").read_text()
    _assert_onnx_matches(out, ref, {"input_ids": ids, "attention_mask": mask})

    out = export(str(ckpt), str(tmp_path / "gguf"), fmt="gguf", gguf_dtype="f32")
    assert json.loads((out / "export.json").read_text())["gguf_arch"] == "llama"
    biases = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out / "model.gguf").tensors if t.name.endswith(".bias")}
    assert sorted(biases) == ["blk.1.ffn_down.bias", "blk.3.ffn_down.bias"]
    for i in (1, 3):
        np.testing.assert_array_equal(biases[f"blk.{i}.ffn_down.bias"], mlp_io.read_mlp(ref, i).down_bias.numpy())


def test_export_refusals(compose_cfg, tmp_path: Path) -> None:
    from src.export.__main__ import export

    cfg = compose_cfg(["model=tiny_bert", "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false"])
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"format='tflite' is not an export format; allowed: \['hf', 'onnx', 'both', 'gguf'\]"):
        export(ckpt, str(tmp_path / "x"), fmt="tflite")
    mine = tmp_path / "my_folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an earlier export"):
        export(ckpt, str(mine), fmt="hf")
    assert (mine / "notes.txt").read_text() == "mine"
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ConfigError, match="is not a checkpoint of this project"):
        export(str(other), str(tmp_path / "y"))
    first = export(ckpt, str(tmp_path / "again"), fmt="hf")
    assert export(ckpt, str(first), fmt="hf") == first  # an earlier export may be replaced


@pytest.mark.parametrize("task", ["mnli", "stsb", "rt_review"])
def test_metrics_on_pairs_regression_and_generation(compose_cfg, tmp_path: Path, task: str) -> None:
    """The NTK and output metrics on a sentence-pair task, on regression, and on generation (mean target log-likelihood)."""
    over = ["model=tiny_bert", f"task={task}", "approx_metrics.probe_size=6"]
    if task != "rt_review":
        from tests.cli.test_train_classification import _glue_dir

        over.append(f"task.data_dir={_glue_dir(tmp_path, task)}")
    else:
        over[0] = "model=tiny_gpt2"
    metrics = train(compose_cfg(over))
    keys = ["fusion/ntk_sign_rel_err", "fusion/ntk_std_rel_err", "fusion/ntk_probe_sign_rel_err", "fusion/output_rel_err", "fusion/hidden_rel_err"]
    for key in keys + ([] if task == "rt_review" else ["fusion/logits_rel_err"]):
        assert 0 <= metrics[key] < 100, key
