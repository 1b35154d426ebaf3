"""``python -m src.compress``: one-shot compression written as an export, in memory or streamed."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from src.compress import compress
from src.export.exported import load_exported
from src.models.build import build_model, load_tokenizer
from src.utils.errors import ConfigError

CALIB = ["ffn_mode=wanda_sp", "ffn_mode.calib.size=16", "ffn_mode.calib.batch_size=8", "ffn_mode.mid_dim=16", "ffn_mode.layers=[1,2,3]",
         "task.max_train_samples=64", "task.max_seq_length=32"]


def _folder_model(compose_cfg, tmp_path: Path) -> list[str]:
    """tiny_llama's random weights saved as a Hugging Face folder (with its tokenizer): a model a folder holds."""
    cfg = compose_cfg(["model=tiny_llama"], config_name="compress", fast=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, "generation")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, max_shard_size="300KB")
    load_tokenizer(cfg.model).save_pretrained(folder)
    return ["model=tiny_llama", "model.config=null", "model.package=null", f"model.name_or_path={folder}"]


def test_in_memory_and_streamed_write_the_same_model(compose_cfg, tmp_path: Path) -> None:
    model = _folder_model(compose_cfg, tmp_path)
    outs = {}
    for stream in ("false", "true"):
        out = tmp_path / f"out-{stream}"
        compress(compose_cfg([*model, *CALIB, f"out={out}", f"stream={stream}"], config_name="compress", fast=False))
        meta = json.loads((out / "export.json").read_text())
        assert meta["method"] == "wanda_sp" and meta["layers"] == [1, 2, 3] and meta["kind"] == "generation" and meta["formats"] == ["hf"]
        assert "fusion/params_after" in meta["metrics"] and (out / "tokenizer.json").is_file()
        outs[stream] = load_exported(out, AutoModelForCausalLM).state_dict()
    assert set(outs["false"]) == set(outs["true"])
    for k, v in outs["false"].items():
        torch.testing.assert_close(outs["true"][k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_a_streamed_gguf_is_the_in_memory_one(compose_cfg, smollm2_tokenizer, tmp_path: Path) -> None:
    """format=gguf streamed: the folder's blocks are read back one at a time into model.gguf (per-layer widths: ``deci``),
    which holds the in-memory file's tensors, and the folder holds what the in-memory one does (no safetensors)."""
    folder = tmp_path / "tiny"
    cfg = compose_cfg(["model=tiny_llama", "model.config.vocab_size=49152"], config_name="compress", fast=False)
    torch.manual_seed(0)
    build_model(cfg.model, "generation").save_pretrained(folder, max_shard_size="300KB")
    smollm2_tokenizer.save_pretrained(folder)  # a tokenizer llama.cpp names
    model = ["model=tiny_llama", "model.config=null", "model.package=null", f"model.name_or_path={folder}"]
    readers = {}
    for stream in ("false", "true"):
        out = tmp_path / f"out-{stream}"
        compress(compose_cfg([*model, *CALIB, f"out={out}", f"stream={stream}", "format=gguf", "gguf_dtype=f32"], config_name="compress", fast=False))
        assert json.loads((out / "export.json").read_text())["gguf_arch"] == "deci"
        readers[stream] = gguf.GGUFReader(out / "model.gguf")
    assert sorted(p.name for p in (tmp_path / "out-true").iterdir()) == sorted(p.name for p in (tmp_path / "out-false").iterdir())
    tensors = {stream: {t.name: t for t in r.tensors} for stream, r in readers.items()}
    assert list(tensors["true"]) == list(tensors["false"])
    for name, t in tensors["false"].items():
        np.testing.assert_allclose(tensors["true"][name].data, t.data, rtol=1e-5, atol=1e-5, err_msg=name)
    fields = {stream: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")} for stream, r in readers.items()}
    assert fields["true"] == fields["false"]


def test_auto_streams_when_the_model_does_not_fit(compose_cfg, tmp_path: Path, caplog) -> None:
    model = _folder_model(compose_cfg, tmp_path)
    with caplog.at_level("INFO"):
        compress(compose_cfg([*model, *CALIB, f"out={tmp_path / 'o'}", "memory_gb=0.001"], config_name="compress", fast=False))
    assert "streaming one block at a time" in caplog.text


@pytest.mark.parametrize("overrides,message", [
    (["format=pdf"], "format='pdf' is not an output format"),
    (["stream=maybe"], "stream='maybe' must be auto, true or false"),
    (["stream=true", "format=onnx"], "stream=true writes format=hf or gguf, not onnx: ONNX export traces the whole model"),
    (["stream=true"], "built from model.config with random weights"),
    (["ffn_mode=none"], "ffn_mode=none: src.compress has nothing to do"),
    (["model=tiny_bert", "task=rt_polarity"], "is a classification model: src.compress writes causal language models"),
])
def test_refusals(compose_cfg, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compress(compose_cfg(["model=tiny_llama", f"out={tmp_path / 'o'}", *overrides], config_name="compress", fast=False))
    assert not (tmp_path / "o").exists()


def test_a_pickle_folder_is_refused_before_work(compose_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    build_model(compose_cfg(["model=tiny_llama"], config_name="compress", fast=False).model, "generation").config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    cfg = compose_cfg(["model=tiny_llama", "model.config=null", "model.package=null", f"model.name_or_path={folder}", "ffn_mode=prune",
                       f"out={tmp_path / 'o'}", "stream=true"], config_name="compress", fast=False)
    with pytest.raises(ConfigError, match="pickle files"):
        compress(cfg)


def test_train_and_evaluate_continue_from_the_compressed_folder(compose_cfg, tmp_path: Path) -> None:
    from src.train import train

    model = _folder_model(compose_cfg, tmp_path)
    out = tmp_path / "c"
    compress(compose_cfg([*model, *CALIB, f"out={out}", "stream=true"], config_name="compress", fast=False))
    assert "mlp_fusion" in json.loads((out / "config.json").read_text())  # per-layer widths: not a stock model
    folder = ["model=tiny_llama", "model.config=null", "model.package=null", f"model.name_or_path={out}"]
    metrics = train(compose_cfg([*folder, "task=rt_review", "ffn_mode=none", "finetune=lora", "test=false"]))
    assert "val/ppl" in metrics


def test_a_disk_without_room_is_refused_before_work(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    import shutil as sh

    import src.compress

    monkeypatch.setattr(src.compress.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"the compressed model needs about 0.0 GB and the disk holding it has 0.0 GB free"):
        compress(compose_cfg(["model=tiny_llama", f"out={tmp_path / 'o'}", *CALIB], config_name="compress", fast=False))
    assert not (tmp_path / "o").exists()
