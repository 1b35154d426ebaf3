"""GGUF export (src.export.to_gguf, src.export format=gguf), checked by llama.cpp itself.

The refusals, the atomic write and the tensors a file holds (read back with gguf's reader) run in
the fast tier; everything that loads a file in llama.cpp is the ``deploy`` tier (``make
test-deploy``: llama-cpp-python, built from source on this machine).
The tiny models there are random Llamas and Qwens with SmolLM2's tokenizer (a byte-level BPE that
llama.cpp knows), so that the file is one a user could run.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from src.export.to_gguf import gguf_unsupported, write_gguf
from src.methods.types import FusedMLP, MLPWeights
from src.models import mlp_io
from src.models.build import load_tokenizer
from src.models.shards import ShardReader, skeleton
from src.train import train
from src.utils.errors import ConfigError
from tests.conftest import CONF

PROMPTS = ["The film was", "I watched it twice, and the second time the ending", "Critics say the cast"]
GREEDY = 32  # tokens llama.cpp must reproduce
# llama.cpp vs PyTorch logits, relative Frobenius error over a prompt's positions; measured on the tiny random
# models below (2-core CPU): f32 4.7e-4 .. 6.4e-4, f16 1.1e-3, bf16 8.5e-3, q8_0 2.8e-2 (Llama 3 RoPE without its
# factors: 0.30). On SmolLM2's defaults: see test_smollm2_defaults_export_reproduces_pytorch_in_llama_cpp.
RTOL = {"f32": 2e-3, "f16": 5e-3, "bf16": 2e-2, "q8_0": 6e-2}


def _tiny_ckpt(compose_cfg, model: str) -> str:
    cfg = compose_cfg([f"model={model}", "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false",
                       *(["task=rt_review"] if model == "tiny_llama" else [])])
    train(cfg)
    return str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")


def test_gguf_refusals_come_before_anything_is_written(compose_cfg, tmp_path: Path) -> None:
    from src.export.__main__ import export

    bert = _tiny_ckpt(compose_cfg, "tiny_bert")
    with pytest.raises(ConfigError, match=r"format=gguf is refused for model=tiny_bert: llama.cpp runs causal LMs, and this is a "
                                          r"classification model; export it with format=hf or onnx\."):
        export(bert, str(tmp_path / "a"), fmt="gguf")
    with pytest.raises(ConfigError, match=r"gguf_dtype='q4_k' is not a GGUF weight type this export writes; allowed: "
                                          r"\['f32', 'f16', 'bf16', 'q8_0'\]\."):
        export(bert, str(tmp_path / "a"), fmt="gguf", gguf_dtype="q4_k")
    llama = _tiny_ckpt(compose_cfg, "tiny_llama")  # MiniLM's WordPiece tokenizer: not one llama.cpp's BPE reads
    with pytest.raises(ConfigError, match=r"format=gguf is refused for model=tiny_llama: its tokenizer is not a byte-level BPE"):
        export(llama, str(tmp_path / "a"), fmt="gguf")
    assert not (tmp_path / "a").exists()


def test_an_interrupted_gguf_export_leaves_no_file(compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import src.export.__main__ as export_cli

    def half(model, tokenizer, folder, path: Path, dtype) -> dict:
        path.write_bytes(b"GGUF\x03\x00\x00\x00 half")
        raise KeyboardInterrupt

    llama = _tiny_ckpt(compose_cfg, "tiny_llama")
    monkeypatch.setattr(export_cli, "gguf_unsupported", lambda model, tokenizer: None)
    monkeypatch.setattr(export_cli, "write_gguf", half)
    with pytest.raises(KeyboardInterrupt):
        export_cli.export(llama, str(tmp_path / "out"), fmt="gguf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------------------------------ deploy tier


def _llama(path: Path, n_ctx: int = 256):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (make test-deploy) is not installed")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=torch.get_num_threads(), logits_all=True, verbose=False)


def _compare(model: PreTrainedModel, path: Path, ids_list: list[list[int]], n: int = GREEDY) -> tuple[float, list[bool]]:
    """Largest relative logits error over the prompts, and whether each prompt's n greedy tokens agree
    (llama.cpp: argmax of its own logits, one token at a time; PyTorch: argmax of a full forward)."""
    llm = _llama(path)
    errs, same = [], []
    try:
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            ours = np.array(llm.scores[: llm.n_tokens])  # [T, V]
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].float().numpy()
            errs.append(float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
            cpp, pt = list(ids), list(ids)
            for _ in range(n):
                cpp.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([cpp[-1]])
                with torch.no_grad():
                    pt.append(int(model(torch.tensor([pt])).logits[0, -1].argmax()))
            same.append(cpp == pt)
    finally:
        llm.close()
    return max(errs), same


def _tiny(model_type: str, narrow: bool = False, down_bias: bool = False, **extra) -> PreTrainedModel:
    """A random tiny causal LM with SmolLM2's vocabulary; ``narrow``: layer 1's MLP cut to 40 of 128 neurons;
    ``down_bias``: layer 1's down projection alone given a bias (bias compensation's, in a bias-free model)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True,
                                  initializer_range=0.1, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    if narrow or down_bias:
        w = mlp_io.read_mlp(model, 1)
        k, bias = 40 if narrow else w.width, 0.1 * torch.randn(w.hidden_size) if down_bias else None
        mlp_io.write_mlp(model, 1, FusedMLP(MLPWeights(up=w.up[:k], down=w.down[:, :k], down_bias=bias, gate=w.gate[:k], activation=w.activation),
                                            scale=torch.full((k,), 2.0)))
        mlp_io.fold_scales(model)
    return model


TINY = {
    "llama": dict(model_type="llama"),
    "llama_per_layer_widths": dict(model_type="llama", narrow=True),
    "llama_down_bias": dict(model_type="llama", down_bias=True),
    "llama_per_layer_widths_down_bias": dict(model_type="llama", narrow=True, down_bias=True),
    "llama3_rope": dict(model_type="llama", rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
}
ARCH = {"llama_per_layer_widths": "deci", "llama_per_layer_widths_down_bias": "deci", "llama3_rope": "llama", "mistral": "llama",
        "llama_down_bias": "llama"}  # the llama.cpp architecture of each case not named after its own


@pytest.mark.parametrize("case", ["llama_down_bias", "llama_per_layer_widths_down_bias"])
def test_a_down_bias_is_written_as_the_optional_tensor_llama_cpp_adds(smollm2_tokenizer, tmp_path: Path, case: str) -> None:
    """A down projection's bias (layer 1 only) is ``blk.1.ffn_down.bias``, f32 in any file type: llama.cpp's llama and deci
    loaders create it in every block as optional (TENSOR_NOT_REQUIRED) and pass it to build_ffn, which adds it."""
    model = _tiny(**TINY[case])
    assert gguf_unsupported(model, smollm2_tokenizer) is None
    smollm2_tokenizer.save_pretrained(tmp_path)
    assert write_gguf(model, smollm2_tokenizer, tmp_path, tmp_path / "m.gguf", "q8_0")["gguf_arch"] == ARCH[case]
    biases = [t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors if t.name.endswith(".bias")]
    assert [(t.name, t.tensor_type) for t in biases] == [("blk.1.ffn_down.bias", gguf.GGMLQuantizationType.F32)]
    np.testing.assert_array_equal(biases[0].data, mlp_io.read_mlp(model, 1).down_bias.numpy())


def test_a_down_bias_is_refused_where_llama_cpp_has_no_tensor_for_it(smollm2_tokenizer) -> None:
    """qwen2 and qwen3 create no ffn_down.bias (a file with a tensor the loader does not create fails to load:
    "wrong number of tensors"): refused, naming the layer."""
    assert gguf_unsupported(_tiny("qwen3", down_bias=True, head_dim=32), smollm2_tokenizer) == (
        "layer 1's MLP down projection has a bias, which llama.cpp's qwen3 architecture has no tensor for")


@pytest.mark.parametrize(("case", "dtype"), [("llama", "f32"), ("llama3_rope", "q8_0"), ("qwen3", "bf16"), ("mistral", "f16")])
def test_a_skeleton_read_block_by_block_writes_the_same_file(smollm2_tokenizer, tmp_path: Path, case: str, dtype: str) -> None:
    """With a reader (a streamed compression's output), the model is a meta skeleton and each block is read while it
    is written: the file is byte for byte the one the model in memory gives."""
    model = _tiny(**TINY[case])
    folder = tmp_path / "folder"
    model.save_pretrained(folder)
    model.config._name_or_path = str(folder)  # general.name: the skeleton's config names its folder
    smollm2_tokenizer.save_pretrained(folder)
    skel = skeleton(AutoModelForCausalLM, folder)
    assert all(t.is_meta for t in skel.parameters())
    write_gguf(model, smollm2_tokenizer, folder, tmp_path / "memory.gguf", dtype)
    meta = write_gguf(skel, smollm2_tokenizer, folder, tmp_path / "read.gguf", dtype, reader=ShardReader(folder))
    assert (tmp_path / "read.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes()
    assert meta["gguf_bytes"] == (tmp_path / "memory.gguf").stat().st_size
    assert all(t.is_meta for t in skel.parameters())  # each block dropped after it was written


@pytest.mark.deploy
@pytest.mark.parametrize("case", sorted(TINY))
def test_tiny_models_run_in_llama_cpp(smollm2_tokenizer, tmp_path: Path, case: str) -> None:
    """f32: llama.cpp's logits match PyTorch's and its greedy tokens are PyTorch's; per-layer widths become ``deci``."""
    model = _tiny(**TINY[case])
    assert gguf_unsupported(model, smollm2_tokenizer) is None
    smollm2_tokenizer.save_pretrained(tmp_path)
    meta = write_gguf(model, smollm2_tokenizer, tmp_path, tmp_path / "m.gguf", "f32")
    assert meta["gguf_arch"] == ARCH.get(case, case)
    ids = [smollm2_tokenizer.encode(p) for p in PROMPTS]
    ids.append(ids[0] * 12)  # past 64 positions: where Llama 3's low-frequency RoPE factors matter
    err, same = _compare(model, tmp_path / "m.gguf", ids)
    assert err < RTOL["f32"] and all(same), (err, same)


@pytest.mark.deploy
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_weight_types_load_and_stay_close(smollm2_tokenizer, tmp_path: Path, dtype: str) -> None:
    """f16, bf16 and q8_0 files load; q8_0 writes a 40-wide down projection (not a multiple of 32) as f16."""
    model = _tiny("llama", narrow=True)
    smollm2_tokenizer.save_pretrained(tmp_path)
    meta = write_gguf(model, smollm2_tokenizer, tmp_path, tmp_path / "m.gguf", dtype)
    assert meta["gguf_f16_fallbacks"] == (["blk.1.ffn_down.weight"] if dtype == "q8_0" else [])
    err, _ = _compare(model, tmp_path / "m.gguf", [smollm2_tokenizer.encode(PROMPTS[1])], n=0)
    assert err < RTOL[dtype], err



@pytest.mark.parametrize(("name_or_path", "name"), [("/home/me/models/SmolLM2-135M-Instruct/", "SmolLM2-135M-Instruct"),
                                                    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"), ("", "llama")])
def test_general_name_is_a_name_not_the_local_folders_path(smollm2_tokenizer, tmp_path: Path, name_or_path: str, name: str) -> None:
    """``general.name`` is the model folder's (or Hub id's) last part, as llama.cpp's converter names a model; a random
    model without a source is named by its model type."""
    model = _tiny("llama")
    model.config.name_or_path = name_or_path
    smollm2_tokenizer.save_pretrained(tmp_path)
    write_gguf(model, smollm2_tokenizer, tmp_path, tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == name

@pytest.mark.deploy
@pytest.mark.slow  # SmolLM2: compress with calibration, one step, export twice (~3 min on two cores)
def test_smollm2_defaults_export_reproduces_pytorch_in_llama_cpp(compose_cfg, tmp_path: Path) -> None:
    """The issue's check: SmolLM2 with its defaults (wanda_sp + refit, layers 10-29 at 1152) exports to GGUF; llama.cpp
    reproduces the exported model's greedy tokens at f32, and its logits at f16 to RTOL["f16"]."""
    from transformers import AutoModelForCausalLM as Auto

    from src.export.__main__ import export
    from src.export.exported import load_exported

    cfg = compose_cfg(["model=smollm2", "task=rt_review", "approx_metrics.enabled=false", "trainer.max_steps=1", "test=false"])
    cfg.paths.cache_dir = str(Path(CONF).parent / ".cache")  # the dequantized SmolLM2, shared with make train
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    out = export(ckpt, str(tmp_path / "f32"), fmt="gguf", gguf_dtype="f32")
    hf = export(ckpt, str(tmp_path / "hf"), fmt="hf")
    model = load_exported(hf, Auto)
    assert mlp_io.intermediate_sizes(model) == [1536] * 10 + [1152] * 20
    tok = load_tokenizer(cfg.model)
    ids = [tok.encode(p) for p in PROMPTS]
    err, same = _compare(model, out / "model.gguf", ids)
    assert all(same) and err < RTOL["f32"], (err, same)
    card = (out / "README.md").read_text()
    assert "architecture `deci`" in card and "llama-cli -m model.gguf" in card
    fields = gguf.GGUFReader(out / "model.gguf").fields
    assert "tokenizer.chat_template" in fields and "tokenizer.ggml.merges" in fields  # SmolLM2-Instruct's template travels
    f16 = export(ckpt, str(tmp_path / "f16"), fmt="gguf", gguf_dtype="f16")
    err16, _ = _compare(model, f16 / "model.gguf", ids, n=0)
    print(f"\nSmolLM2 defaults in llama.cpp: logits rel. err f32 {err:.1e}, f16 {err16:.1e}; {GREEDY} greedy tokens the same "
          f"on {sum(same)}/{len(same)} prompts")  # the numbers the README quotes (pytest -s)
    assert err16 < RTOL["f16"], err16


@pytest.mark.deploy
@pytest.mark.slow  # SmolLM2: compressed once in memory (to GGUF), once streamed (the cache makes it quick)
def test_src_compress_smollm2_gguf_runs_in_llama_cpp_and_equals_the_streamed_folder(compose_cfg, tmp_path: Path) -> None:
    """Issue 33's check: ``python -m src.compress model=smollm2 out=<dir> format=gguf`` writes a model llama.cpp runs, whose
    logits and greedy tokens are those of the same compression streamed one block at a time into a Hugging Face folder;
    so does the same command streamed (``stream=true``), its GGUF file written from the streamed shards."""
    from transformers import AutoModelForCausalLM as Auto

    from src.compress import compress
    from src.export.exported import load_exported

    common = ["model=smollm2", f"paths.cache_dir={Path(CONF).parent / '.cache'}"]  # the dequantized SmolLM2, shared with make train
    gguf_dir = compress(compose_cfg([*common, f"out={tmp_path / 'gguf'}", "format=gguf", "gguf_dtype=f32", "stream=false"],
                                    config_name="compress", fast=False))
    hf_dir = compress(compose_cfg([*common, f"out={tmp_path / 'hf'}", "stream=true"], config_name="compress", fast=False))
    model = load_exported(hf_dir, Auto)
    assert mlp_io.intermediate_sizes(model) == [1536] * 10 + [1152] * 20
    tok = load_tokenizer(compose_cfg(["model=smollm2"], config_name="compress", fast=False).model)
    err, same = _compare(model, gguf_dir / "model.gguf", [tok.encode(p) for p in PROMPTS])
    assert all(same) and err < RTOL["f32"], (err, same)
    # streamed into a GGUF file (read back from its bf16 shards block by block): llama.cpp runs it, as the folder
    streamed = compress(compose_cfg([*common, f"out={tmp_path / 'sg'}", "format=gguf", "gguf_dtype=f32", "stream=true"], config_name="compress",
                                    fast=False))
    err, same = _compare(model, streamed / "model.gguf", [tok.encode(p) for p in PROMPTS])
    assert all(same) and err < RTOL["f32"], (err, same)
