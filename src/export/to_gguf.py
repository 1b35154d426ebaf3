"""GGUF files that llama.cpp runs: a (compressed) Llama-family causal LM, its tokenizer and chat template.

Which llama.cpp architecture a model becomes (read from llama.cpp's loader, ``src/llama-model.cpp``
and ``src/models/*.cpp``, at the version llama-cpp-python 0.3.36 vendors):

- ``llama`` (Llama, SmolLM2, Mistral) and ``qwen2`` / ``qwen3`` build every block's FFN tensors with
  one width (layer 0's ``feed_forward_length``): a model whose MLP widths are uniform is a stock file
  of its architecture.
- ``deci`` (Nemotron's pruned Llamas) reads ``feed_forward_length``, ``head_count`` and
  ``head_count_kv`` per block and builds each block at its own width: a Llama whose compressed
  layers are narrower than the rest becomes a ``deci`` file, otherwise the same Llama block.
  Qwen2/3 have no such architecture (q/k norms, biases): per-layer widths there are refused.

A down projection's bias (bias compensation in an otherwise bias-free Llama, in any layer) is written
as ``blk.N.ffn_down.bias``: the ``llama`` and ``deci`` loaders create that tensor in every block as an
optional one (``TENSOR_NOT_REQUIRED``, ``src/models/llama.cpp`` and ``deci.cpp``) and their graphs pass it
to ``build_ffn``, which adds it after the down projection; ``qwen2`` and ``qwen3`` create no such tensor
(a file with one does not load), so a down bias there is refused.

``llama`` and ``deci`` rotate adjacent pairs in RoPE where transformers rotates halves, so q and k
rows are permuted per head (``_permute``, as llama.cpp's own converter does); ``qwen2``/``qwen3``
rotate halves like transformers. Norms, biases and RoPE factors are float32, the 2-D weights
``dtype`` (q8_0 falls back to f16 for a tensor whose input width is not a multiple of 32, as
llama.cpp's converter does). Count scales must be folded first (``exported.prepare_for_export``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from src.models import mlp_io
from src.models.replacements import LowRankLinear
from src.models.shards import ShardReader, materialize, release

# model_type -> llama.cpp architecture (at uniform widths)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PAIR_ROPE = ("llama", "deci")  # architectures whose RoPE rotates adjacent pairs: q/k rows permuted
DOWN_BIAS = ("llama", "deci")  # architectures that load and add an optional blk.N.ffn_down.bias
Q = gguf.GGMLQuantizationType
DTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of str(token ids) of this text
# (its converter's ``get_vocab_base_pre``); the ones of the tokenizers this project's models use
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
          "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
          "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 .. Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 (embedding release)
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


def _rope(config) -> dict[str, Any]:
    return getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}


def pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """llama.cpp's name of the tokenizer's pre-tokenizer, or None when it is not one named here."""
    return PRE_TOKENIZERS.get(hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest())


def _arch(model: PreTrainedModel) -> str | None:
    """The llama.cpp architecture ``model`` is written as: ``deci`` for a Llama with per-layer widths, else its
    model type's; None where llama.cpp has none here."""
    arch = ARCHS.get(model.config.model_type)
    return "deci" if arch == "llama" and len(set(mlp_io.intermediate_sizes(model))) > 1 else arch


def gguf_unsupported(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why ``model`` cannot be written as a GGUF file llama.cpp runs (one clause), or None."""
    config = model.config
    arch = _arch(model)
    if arch is None:
        return (f"the GGUF export covers Llama-family causal LMs ({', '.join(ARCHS)}), and model_type {config.model_type!r} "
                "is not one (encoders, encoder-decoders and MoE models have no llama.cpp architecture here)")
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        return "low-rank (svd) layers are factor pairs, which llama.cpp's architectures have no tensors for"
    if len(set(mlp_io.intermediate_sizes(model))) > 1 and arch != "deci":
        return (f"llama.cpp builds every {arch} block's FFN at one width, and this model's differ per layer "
                f"({sorted(set(mlp_io.intermediate_sizes(model)))}); compress every layer to one width")
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):  # (qwen2's q/k/v biases are no option)
        return "MLP or attention biases in a Llama are not written by this export"
    biased = [i for i in range(mlp_io.num_layers(model)) if mlp_io.layer_spec(model, i).down_bias]
    if biased and arch not in DOWN_BIAS:
        return f"layer {biased[0]}'s MLP down projection has a bias, which llama.cpp's {arch} architecture has no tensor for"
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "llama3") or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return f"RoPE type {rope.get('rope_type')!r} (or a partial rotary factor) is not written by this export (default and llama3 are)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return f"sliding-window attention ({window} tokens) is not in llama.cpp's {arch} graph"
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return "its tokenizer is not a fast (tokenizer.json) tokenizer"
    if json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE" or pre_tokenizer(tokenizer) is None:
        return ("its tokenizer is not a byte-level BPE tokenizer whose pre-tokenizer llama.cpp names here (SmolLM2, Llama 3, "
                "Qwen2/3, Mistral Nemo, GPT-2)")
    return None


def _permute(w: Tensor, n_head: int) -> Tensor:
    """Rows of q or k [n_head * d, ...] from transformers' rotate-half order to llama.cpp's adjacent pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama3_factors(rope: dict[str, Any], head_dim: int) -> Tensor:
    """Llama 3.1's RoPE frequency divisors [head_dim / 2] (llama.cpp's ``rope_freqs.weight``)."""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    old, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / rope["factor"] + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, rope["factor"], mid)).float()


class _Tensors:
    """Adds tensors to a writer in two passes over the same sequence of ``add`` calls: first their infos (shapes
    only, so a meta tensor will do), then their data, one tensor at a time, so the file is never whole in memory.
    1-D tensors float32, 2-D ones in the file's dtype (q8_0: f16 where it cannot)."""

    def __init__(self, writer: gguf.GGUFWriter, qtype: Q) -> None:
        self.writer, self.qtype, self.fallbacks, self.data = writer, qtype, [], False

    def _qtype(self, name: str, shape: tuple[int, ...]) -> Q:
        qtype = Q.F32 if len(shape) == 1 else self.qtype
        if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            if not self.data:
                self.fallbacks.append(name)
            return Q.F16
        return qtype

    def add(self, name: str, t: Tensor) -> None:
        qtype = self._qtype(name, tuple(t.shape))
        if not self.data:
            if qtype in (Q.F32, Q.F16):
                dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
                self.writer.add_tensor_info(name, tuple(t.shape), dtype, t.numel() * dtype.itemsize)
            else:  # the quantised bytes' shape, as add_tensor is given it
                shape = gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype)
                self.writer.add_tensor_info(name, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=qtype)
            return
        a = t.detach().float().cpu().numpy()
        if qtype == Q.F32:
            self.writer.write_tensor_data(np.ascontiguousarray(a, dtype=np.float32))
        elif qtype == Q.F16:
            self.writer.write_tensor_data(a.astype(np.float16))
        else:
            self.writer.write_tensor_data(gguf.quants.quantize(a, qtype))


@contextmanager
def _loaded(module: nn.Module, prefix: str, reader: ShardReader | None) -> Iterator[None]:
    """``module``'s tensors read from ``reader`` (float32, CPU) for the body of the ``with``, dropped after; without
    a reader the module is in memory already."""
    if reader is None:
        yield
        return
    materialize(module, prefix, reader, torch.device("cpu"), torch.float32)
    try:
        yield
    finally:
        release(module)
        reader.close()  # the shard's memory map goes with it, as a streamed compression drops each block's


def _vocab(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, folder: Path, n_vocab: int) -> None:
    """The tokenizer as llama.cpp's BPE vocabulary: tokens (ids without a token padded as unused), their types
    (special added tokens are control tokens), merges, special ids and the chat template (``gguf.SpecialVocab``)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens.update({i: a["content"] for i, a in added.items()})
    T = gguf.TokenType
    kind = {i: T.CONTROL if a["special"] else T.USER_DEFINED for i, a in added.items()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)])
    writer.add_token_types([kind.get(i, T.NORMAL) if i in tokens else T.UNUSED for i in range(n_vocab)])
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)


@torch.no_grad()
def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokenizer_folder: Path, path: Path, dtype: str,
               reader: ShardReader | None = None) -> dict[str, Any]:
    """Write ``model`` (scales folded) as the GGUF file ``path``; returns what the card reports.

    ``tokenizer_folder`` holds the saved tokenizer (tokenizer.json, tokenizer_config.json), which
    ``gguf.SpecialVocab`` reads for merges, special ids and the chat template. With ``reader``, ``model`` is a
    skeleton (``src.models.shards``) of the folder ``reader`` reads, and one block at a time is read: a streamed
    compression's output becomes a GGUF file without the model ever being whole in memory."""
    reason = gguf_unsupported(model, tokenizer)
    assert reason is None, reason  # the caller refuses before writing
    config = model.config
    widths = mlp_io.intermediate_sizes(model)
    arch = _arch(model)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    n_layer, rope = config.num_hidden_layers, _rope(config)
    qtype, file_type = DTYPES[dtype]

    w = gguf.GGUFWriter(path, arch)
    # a name, not the local folder's path (which would leak into a shared file): the folder's or Hub id's last part, as
    # llama.cpp's converter names a model by its folder
    w.add_name(Path(getattr(config, "name_or_path", "") or "").name or config.model_type)
    w.add_file_type(file_type)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(n_layer)
    per_layer = arch == "deci"  # deci reads these per block
    w.add_feed_forward_length(widths if per_layer else widths[0])
    w.add_head_count([n_head] * n_layer if per_layer else n_head)
    w.add_head_count_kv([n_kv] * n_layer if per_layer else n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    _vocab(w, tokenizer, tokenizer_folder, config.vocab_size)

    t = _Tensors(w, qtype)
    _add_tensors(model, t, arch, head_dim, rope, None)  # the infos: shapes only (a skeleton's meta tensors will do)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t.data = True
    _add_tensors(model, t, arch, head_dim, rope, reader)
    w.close()
    return {"gguf_arch": arch, "gguf_dtype": dtype, "gguf_f16_fallbacks": t.fallbacks, "gguf_bytes": path.stat().st_size}


def _add_tensors(model: PreTrainedModel, t: _Tensors, arch: str, head_dim: int, rope: dict[str, Any], reader: ShardReader | None) -> None:
    """Every tensor of the file in llama.cpp's order and names, each block read from ``reader`` while it is added."""
    config, body = model.config, model.model
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    name = lambda kind, i=None: gguf.TENSOR_NAMES[kind].format(bid=i)  # noqa: E731
    M = gguf.MODEL_TENSOR
    with _loaded(body.embed_tokens, "model.embed_tokens.", reader):
        t.add(f"{name(M.TOKEN_EMBD)}.weight", body.embed_tokens.weight)
    if rope.get("rope_type") == "llama3":
        t.add(f"{name(M.ROPE_FREQS)}.weight", _llama3_factors(rope, head_dim))
    pair = arch in PAIR_ROPE
    for i, block in enumerate(body.layers):
        with _loaded(block, f"model.layers.{i}.", reader):
            att = block.self_attn
            q, k = att.q_proj, att.k_proj
            t.add(f"{name(M.ATTN_NORM, i)}.weight", block.input_layernorm.weight)
            t.add(f"{name(M.ATTN_Q, i)}.weight", _permute(q.weight, n_head) if pair else q.weight)
            t.add(f"{name(M.ATTN_K, i)}.weight", _permute(k.weight, n_kv) if pair else k.weight)
            t.add(f"{name(M.ATTN_V, i)}.weight", att.v_proj.weight)
            t.add(f"{name(M.ATTN_OUT, i)}.weight", att.o_proj.weight)
            for kind, proj in ((M.ATTN_Q, q), (M.ATTN_K, k), (M.ATTN_V, att.v_proj)):  # qwen2
                if proj.bias is not None:
                    t.add(f"{name(kind, i)}.bias", proj.bias)
            if hasattr(att, "q_norm"):  # qwen3
                t.add(f"{name(M.ATTN_Q_NORM, i)}.weight", att.q_norm.weight)
                t.add(f"{name(M.ATTN_K_NORM, i)}.weight", att.k_norm.weight)
            t.add(f"{name(M.FFN_NORM, i)}.weight", block.post_attention_layernorm.weight)
            mlp = mlp_io.read_mlp(model, i)  # [d, h] gate / up, [h, d] down: llama.cpp's {n_embd, n_ff} / {n_ff, n_embd}
            t.add(f"{name(M.FFN_GATE, i)}.weight", mlp.gate)
            t.add(f"{name(M.FFN_UP, i)}.weight", mlp.up)
            t.add(f"{name(M.FFN_DOWN, i)}.weight", mlp.down)
            if mlp.down_bias is not None:  # llama / deci only (gguf_unsupported)
                t.add(f"{name(M.FFN_DOWN, i)}.bias", mlp.down_bias)
    with _loaded(body.norm, "model.norm.", reader):
        t.add(f"{name(M.OUTPUT_NORM)}.weight", body.norm.weight)
    if not config.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        with _loaded(model.lm_head, "lm_head.", reader):
            t.add(f"{name(M.OUTPUT)}.weight", model.lm_head.weight)
