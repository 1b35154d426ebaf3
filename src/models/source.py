"""Where a ``model`` config's weights come from, and the identity of those exact weights.

First match wins: ``name_or_path`` (a local folder, or a Hub id, failing fast offline when it is not
in the local Hugging Face cache), then ``package`` ("<installed python package>/<subfolder>", the
offline assets of docs/assets.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.utils.errors import ConfigError
from src.utils.hub import hub_reachable


def as_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    """A model config as a plain, resolved dict."""
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
    cfg = as_dict(cfg)
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


def model_identity(cfg: DictConfig | dict) -> str:
    """A string naming the exact weights: source plus revision, or the random architecture's config."""
    cfg = as_dict(cfg)
    if cfg.get("config") is not None:
        return "random:" + hashlib.sha256(json.dumps(cfg["config"], sort_keys=True).encode()).hexdigest()[:16]
    src = cfg.get("name_or_path") or cfg.get("package")
    return f"{src}@{cfg.get('revision') or 'local'}" + (f":{cfg['gguf_file']}" if cfg.get("gguf_file") else "")
