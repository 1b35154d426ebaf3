"""Builds tokenizers and Hugging Face models from a ``model`` config group entry.

Where the weights come from is ``src.models.source``'s job. With ``config`` set, the architecture is built from that dict with random weights and only the
tokenizer comes from the folder. ``gguf_file`` names a GGUF file inside the folder; with
``cache_dir`` set, ``src.models.gguf`` dequantizes it once into a plain folder that every later
load reads instead.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from src.models import gguf, mlp_io
from src.models.source import as_dict, resolve_source
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)

HEADS = {"classification": AutoModelForSequenceClassification, "generation": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}
# model.dtype: the torch dtypes loaded weights may take
DTYPES = ("float32", "bfloat16", "float16")


def check_model_folder(folder: str, cfg: dict[str, Any]) -> None:
    """Refuse a local model folder that lacks the files a load needs, before loading anything."""
    path = Path(folder)
    if not path.is_dir():
        return  # a Hub id
    if cfg.get("gguf_file"):
        needed = [cfg["gguf_file"]]
    else:
        needed = ["config.json"] if cfg.get("config") is None else []
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if cfg.get("config") is None and not has_weights:
            needed.append("model.safetensors (or pytorch_model.bin)")
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json"))
    if not cfg.get("gguf_file") and not has_tokenizer:
        needed.append("tokenizer.json (or vocab.txt / vocab.json / tokenizer.model)")
    missing = [f for f in needed if not (path / f.split(" ")[0]).exists()]
    if missing:
        raise ConfigError(f"model folder {folder} lacks {', '.join(missing)}: it is not a complete Hugging Face model folder.")
    if "config.json" in needed:
        check_config_json(path / "config.json", bool(cfg.get("trust_remote_code")))


def check_config_json(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse a ``config.json`` that is not JSON or names a ``model_type`` this transformers lacks, in one sentence
    (transformers' own errors are a traceback and a paragraph on upgrading it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model folder {path.parent}: its config.json is not JSON ({e}).") from None
    if not isinstance(d, dict):
        raise ConfigError(f"model folder {path.parent}: its config.json holds a {type(d).__name__}, not a JSON object of settings.")
    model_type = d.get("model_type")
    # a model with its own code (auto_map) names a type transformers need not know
    if model_type is not None and model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in d):
        import transformers

        raise ConfigError(f"model folder {path.parent}: its config.json's model_type {model_type!r} is not one transformers "
                          f"{transformers.__version__} knows (a newer architecture needs a newer transformers; one with its own "
                          "code in the folder, model.trust_remote_code=true).")


def load_hf_config(cfg: DictConfig | dict, **overrides: Any) -> PretrainedConfig:
    """The model's transformers config, without loading weights (cheap; used for validation)."""
    cfg = as_dict(cfg)
    if cfg.get("config") is None or cfg.get("name_or_path") or cfg.get("package"):
        src, _ = resolve_source(cfg)  # for a random model built from `config`: the tokenizer's folder
        check_model_folder(src, cfg)
    if cfg.get("config") is not None:
        arch = dict(cfg["config"])
        return AutoConfig.for_model(arch.pop("model_type"), **arch, **overrides)
    src, kwargs = _pretrained_source(cfg)
    return AutoConfig.from_pretrained(src, **kwargs, **overrides)


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover (None: relative positions, no limit in the config)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def task_kind(kind: str, config: PretrainedConfig) -> str:
    """The kind a task of ``kind`` runs as on the model ``config`` describes: seq2seq (text-to-text) on an encoder-decoder
    model, whatever the task; else its own."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else kind


def load_tokenizer(cfg: DictConfig | dict) -> PreTrainedTokenizerBase:
    """The tokenizer; a missing pad token is set to EOS (or UNK), and the log says so."""
    src, kwargs = _pretrained_source(as_dict(cfg))
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        log.info("tokenizer has no pad token: using %r for padding (masked out everywhere)", tok.pad_token)
    return tok


def build_model(cfg: DictConfig | dict, head: str, *, device: torch.device | str | None = None, **config_overrides: Any) -> PreTrainedModel:
    """Instantiate the model with a task head (``classification``, ``generation`` or ``seq2seq``),
    with activation checkpointing where ``gradient_checkpointing`` is set.

    ``device``: where the weights go (None: the CPU). A random model built from ``config`` is
    initialised there (a 1B-parameter model: seconds on a GPU, minutes on the CPU); loaded weights
    are read on the CPU and moved.
    """
    cfg = as_dict(cfg)
    auto = HEADS[head]
    if cfg.get("config") is not None:
        with torch.device(device) if device is not None else nullcontext():
            model = auto.from_config(load_hf_config(cfg, **config_overrides))
    else:
        if gguf.cache_folder(cfg) is not None:
            src, kwargs = str(gguf.dequantize_once(cfg)), {}
        else:
            src, kwargs = _pretrained_source(cfg)
        # transformers 5 loads in the checkpoint's dtype (bfloat16 for most LLMs) unless told: fp32 master
        # weights for 32-true and the mixed precisions, model.dtype=bfloat16 where memory needs it (bf16-true)
        dtype = getattr(torch, cfg.get("dtype") or "float32")
        if Path(src).is_dir() and hasattr(AutoConfig.from_pretrained(src), "mlp_fusion"):  # a compressed folder with per-layer widths
            model = load_exported(src, auto, dtype=dtype)
        else:
            model = auto.from_pretrained(src, **kwargs, dtype=dtype, **config_overrides)
        if device is not None:
            model.to(device)
    if cfg.get("gradient_checkpointing"):
        enable_checkpointing(model)
    return model


def load_exported(folder: str | Path, auto_cls: type, **kwargs: Any) -> PreTrainedModel:
    """Load a folder written by ``src.export`` or ``src.compress``; non-uniform structures are rebuilt from the
    per-layer record in config.json (``mlp_fusion``). ``kwargs``: ``from_pretrained``'s (``dtype``)."""
    config = AutoConfig.from_pretrained(folder)
    spec = getattr(config, "mlp_fusion", None)
    if spec is None:
        return auto_cls.from_pretrained(folder, **kwargs)
    model = auto_cls.from_config(config, **({"dtype": kwargs["dtype"]} if "dtype" in kwargs else {}))
    for layer, layer_spec in spec["layer_specs"].items():
        mlp_io.build_from_spec(model, int(layer), mlp_io.spec_from_dict(layer_spec))
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (output embeddings; T5's encoder and decoder embed_tokens = shared) are stored once
    params = dict(model.named_parameters(remove_duplicate=False))
    stored = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if k not in params or id(params[k]) not in stored]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the recorded structure (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation (gradient) checkpointing of every block: a training step keeps only each block's
    input [B, T, h] and recomputes the block in the backward (about a third more compute; the
    activations held drop from all the blocks' to one block's).

    transformers checkpoints only in training mode with gradients enabled, so evaluation,
    generation, calibration, distillation (its student runs in eval mode) and the NTK metrics run
    the plain forward. The wrapper is the block's own forward, so a compressed MLP put into a block
    later is checkpointed with it. Non-reentrant checkpointing gets every parameter's gradient
    whatever the block's inputs, so the hook transformers adds for the reentrant variant (the input
    embeddings' output made to require grad) is removed: under ``torch.func`` it raises (the NTK
    metrics' vmap), and elsewhere it would make forwards with frozen embeddings track them.
    """
    if not model.supports_gradient_checkpointing:
        raise ConfigError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support it; set it to false.")
    # activation_checkpointing_enable is transformers 5's name of gradient_checkpointing_enable (deprecated, same flags)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def _pretrained_source(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(folder or Hub id, from_pretrained kwargs): the dequantized copy of a GGUF model once it exists."""
    cached = gguf.cache_folder(cfg)
    if cached is not None and (cached / "config.json").is_file():
        return str(cached), {}
    src, kwargs = resolve_source(cfg)
    if cfg.get("gguf_file") and not gguf.plain_folder(src, cfg["gguf_file"]):
        kwargs["gguf_file"] = cfg["gguf_file"]
    return src, kwargs


