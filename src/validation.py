"""Checks that run before any model is loaded or any heavy work starts.

Each raises ConfigError with one sentence naming the setting, its value and what is allowed.
Unknown group options (``task=foo``) are refused earlier by Hydra, which lists the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import PretrainedConfig

from src.utils.errors import ConfigError


def _positive(value: Any, setting: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{setting}={value!r} must be a positive integer.")


def check_run_settings(cfg: DictConfig) -> None:
    """Batch sizes, sequence length, sample limits."""
    for key in ("max_seq_length", "batch_size", "eval_batch_size", "max_train_samples", "max_eval_samples"):
        _positive(cfg.task.get(key), f"task.{key}")


def mlp_shape(hf: PretrainedConfig) -> tuple[int, int]:
    """(number of layers, intermediate size) from a transformers config."""
    n = hf.num_hidden_layers
    d = getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * hf.hidden_size
    return n, d


def resolve_context_length(cfg: DictConfig, hf: PretrainedConfig) -> None:
    """Fill ``task.model_max_positions`` (where the task declares it) from the model's config.

    Generation tasks cut their sequences to fit it, and check that ``max_new_tokens`` does.
    """
    if "model_max_positions" in cfg.task:
        cfg.task.model_max_positions = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)


def resolve_ffn_mode(cfg: DictConfig, hf: PretrainedConfig) -> None:
    """Fill the defaults (top two thirds of the layers, a quarter of the width) and check every option."""
    f = cfg.ffn_mode
    if f.name == "none":
        return
    n, d = mlp_shape(hf)
    with open_dict(f):
        if f.get("layers") is None:
            f.layers = list(range(n - round(2 * n / 3), n))  # the paper: 4..11 of 12
        if f.get("mid_dim") is None:
            f.mid_dim = d // 4
    layers = list(f.layers) if OmegaConf.is_list(f.layers) else f.layers
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"ffn_mode.layers={layers!r} must be a list of layer indices, e.g. [2,3,4,5].")
    if not layers:
        raise ConfigError("ffn_mode.layers=[] is empty: list at least one layer, or use ffn_mode=none.")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"ffn_mode.layers has {bad} out of range: the model has layers 0..{n - 1}.")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"ffn_mode.layers={layers} repeats a layer; each layer can be compressed once.")
    _positive(f.mid_dim, "ffn_mode.mid_dim")
    if not 1 <= f.mid_dim <= d - 1:
        raise ConfigError(f"ffn_mode.mid_dim={f.mid_dim} is out of range: the model's MLPs have width {d}, so allowed is 1..{d - 1}.")
    if f.get("sketch_keep") is not None and not 0 <= f.sketch_keep < f.mid_dim:
        raise ConfigError(f"ffn_mode.sketch_keep={f.sketch_keep} must be in 0..mid_dim-1 = 0..{f.mid_dim - 1}.")
    if f.get("mmd_steps") is not None:
        _positive(f.mmd_steps, "ffn_mode.mmd_steps")
    extra = [i for i in f.get("re_init_layers") or [] if i not in layers]
    if extra:
        raise ConfigError(f"ffn_mode.re_init_layers has {extra}, which are not among ffn_mode.layers={layers}.")


def check_architecture(cfg: DictConfig, hf: PretrainedConfig) -> None:
    """Compression and distillation need an MLP layout we know."""
    if cfg.ffn_mode.name == "none" and cfg.distill.name == "none":
        return
    from src.models.mlp_io import check_supported

    try:
        check_supported(hf)
    except ValueError as e:
        raise ConfigError(f"model={cfg.model.name}: {e}") from None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``last`` means <run dir>/checkpoints/last.ckpt; a path must exist and match model, task and compression."""
    if cfg.ckpt_path is None:
        return None
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        hint = " (ckpt_path=last resumes the run in hydra.run.dir=<its folder>)" if cfg.ckpt_path == "last" else ""
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no checkpoint file at {path}{hint}.")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"ckpt_path={str(path)!r} is not a readable Lightning checkpoint: {e}") from None
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("model", {}).get("name") != cfg.model.name or hp.get("task", {}).get("name") != cfg.task.name:
        raise ConfigError(
            f"ckpt_path={str(path)!r} belongs to model={hp.get('model', {}).get('name')} task={hp.get('task', {}).get('name')}, "
            f"not model={cfg.model.name} task={cfg.task.name}."
        )
    fusion = ckpt.get("fusion")  # written by the fusion callback
    mode = fusion["method"] if fusion else "none"
    if mode != cfg.ffn_mode.name or (fusion and (list(fusion["layers"]) != list(cfg.ffn_mode.layers) or fusion["mid_dim"] != cfg.ffn_mode.mid_dim)):
        got = f"ffn_mode={mode}" + (f" layers={fusion['layers']} mid_dim={fusion['mid_dim']}" if fusion else "")
        now = f"ffn_mode={cfg.ffn_mode.name}" + (f" layers={list(cfg.ffn_mode.layers)} mid_dim={cfg.ffn_mode.mid_dim}" if fusion or cfg.ffn_mode.name != "none" else "")
        raise ConfigError(f"ckpt_path={str(path)!r} was compressed with {got}, but this run asks for {now}.")
    return str(path)
