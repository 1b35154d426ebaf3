"""GGUF models (the offline SmolLM2 of docs/assets.md): dequantized once into a plain Hugging Face folder.

Loading a GGUF file dequantizes it (about 20 s for SmolLM2); the plain safetensors copy under
``model.cache_dir`` loads in seconds, and a GGUF-loaded model could not be saved or exported.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from src.models.source import model_identity, resolve_source
from src.utils.io import atomic_dir

log = logging.getLogger(__name__)


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content; size and mtime key the in-process memo (each run loads three times)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def plain_folder(src: str, gguf_file: str) -> bool:
    """Whether ``src`` is a local folder of plain weights without the model's GGUF file (``model.name_or_path`` set to
    a compressed or exported copy of a GGUF model): it loads as it is."""
    return Path(src).is_dir() and not (Path(src) / gguf_file).is_file()


def cache_folder(cfg: dict[str, Any]) -> Path | None:
    """Where the dequantized copy of a GGUF model lives: ``<model.cache_dir>/<name>-<content hash>``.

    None unless both ``gguf_file`` and ``cache_dir`` are set. A local GGUF file is keyed by its
    content, a Hub one by its identity (id and revision).
    """
    if not (cfg.get("gguf_file") and cfg.get("cache_dir")):
        return None
    src, _ = resolve_source(cfg)
    if plain_folder(src, cfg["gguf_file"]):
        return None
    path = Path(src) / cfg["gguf_file"]
    if path.is_file():
        st = path.stat()
        key = _file_digest(str(path), st.st_size, st.st_mtime_ns)
    else:
        key = hashlib.sha256(model_identity(cfg).encode()).hexdigest()
    return Path(cfg["cache_dir"]).expanduser() / f"{cfg['name']}-{key[:16]}"


def dequantize_once(cfg: dict[str, Any]) -> Path:
    """Dequantize a GGUF model into a plain safetensors folder (model and tokenizer) and return it.

    A GGUF-loaded model refuses ``save_pretrained`` (its config carries ``quantization_config``), so
    the weights go into a model rebuilt from a copy of the config without it. The folder is written
    atomically, so an interrupted or concurrent conversion never leaves a half-written folder.
    """
    folder = cache_folder(cfg)
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
    try:
        with atomic_dir(folder) as tmp:
            plain.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(src, **kwargs).save_pretrained(tmp)
    except FileExistsError:  # a concurrent run finished first: its folder is as good as ours
        pass
    return folder
