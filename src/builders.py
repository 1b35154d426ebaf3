"""Turns a composed config into the pieces of a run: data, LightningModule, compression settings, callbacks, trainer.

Shared by ``src.train``, ``src.approx`` and ``src.export`` so that each entry point stays thin;
``src.preflight`` resolves and checks the config before any of these run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.callbacks.fusion import FusionCallback
from src.callbacks.lm_eval import LmEvalBeforeTraining
from src.compress.method import Method
from src.compress.settings import CalibSettings, CompressionSettings
from src.models.build import load_tokenizer
from src.models.fuse import apply_spec
from src.models.source import model_identity
from src.utils.checkpoint_io import read_torch_file
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


def task_classes(kind: str) -> tuple[Any, Any, Any]:
    """(split loader, DataModule class, LightningModule class) for a task kind."""
    if kind == "classification":
        from src.data.classification import ClassificationDataModule, load_classification_splits
        from src.modules.classifier import ClassificationModule

        return load_classification_splits, ClassificationDataModule, ClassificationModule
    if kind == "generation":
        from src.data.generation import GenerationDataModule, load_generation_splits
        from src.modules.causal_lm import CausalLMModule

        return load_generation_splits, GenerationDataModule, CausalLMModule
    if kind == "seq2seq":  # an encoder-decoder model on any task, text-to-text (src.preflight.resolve sets it)
        from src.data.seq2seq import Seq2SeqDataModule, load_seq2seq_splits
        from src.modules.seq2seq import Seq2SeqModule

        return load_seq2seq_splits, Seq2SeqDataModule, Seq2SeqModule
    raise ValueError(f"unknown task kind {kind!r}")


def build_datamodule(cfg: DictConfig, splits: dict[str, Any]) -> L.LightningDataModule:
    """The task's DataModule over ``splits`` (the preflight's), with the model's tokenizer."""
    _, datamodule_cls, _ = task_classes(cfg.task.kind)
    return datamodule_cls(cfg.task, load_tokenizer(cfg.model), splits, seed=cfg.seed)


def build_data_and_module(cfg: DictConfig, splits: dict[str, Any]) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The DataModule (tokenized splits) and the LightningModule (loads the model weights)."""
    return build_datamodule(cfg, splits), build_module(cfg)


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The task's LightningModule with the model's weights (a random head draws from the global RNG)."""
    _, _, module_cls = task_classes(cfg.task.kind)
    return module_cls(cfg.model, cfg.task, cfg.optim, cfg.finetune, output_dir=cfg.paths.output_dir)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of this project, read safely (weights only) on the CPU; ConfigError in one sentence if it is not one."""
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r} is not a file.")
    ckpt = read_torch_file(path)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "model" not in hp or "task" not in hp or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={str(path)!r} is not a checkpoint of this project (no model/task hyper-parameters).")
    return ckpt


def restore_module(ckpt: dict[str, Any]) -> L.LightningModule:
    """The checkpoint's LightningModule: its architecture built, its compressed structure (``checkpoint["fusion"]``)
    and LoRA adapters (``finetune=lora``) added, its weights loaded."""
    hp = ckpt["hyper_parameters"]
    _, _, module_cls = task_classes(hp["task"]["kind"])
    module = module_cls(hp["model"], hp["task"], hp["optim"], hp.get("finetune"))
    if ckpt.get("fusion"):
        apply_spec(module.model, ckpt["fusion"])
    module.add_adapters()
    module.load_state_dict(ckpt["state_dict"])
    return module


def build_trainer(cfg: DictConfig, module: L.LightningModule, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """``cfg.trainer`` (resolved by the preflight) with the run's callbacks; an FSDP strategy without its own
    ``auto_wrap_policy`` wraps each of the model's transformer blocks (its ``_no_split_modules``)."""
    strategy = cfg.trainer.get("strategy", "auto")
    if not isinstance(strategy, str) and "FSDP" in strategy.get("_target_", "") and strategy.get("auto_wrap_policy") is None:
        names = set(getattr(module.model, "_no_split_modules", None) or [])
        blocks = {type(m) for m in module.model.modules() if type(m).__name__ in names}
        kwargs["strategy"] = instantiate(strategy, auto_wrap_policy=blocks or None)
    return instantiate(cfg.trainer, callbacks=callbacks, **kwargs)


def compression_settings(cfg: DictConfig) -> CompressionSettings | None:
    """The run's compression settings from ``cfg.ffn_mode`` (None for ``ffn_mode=none``), after
    ``src.preflight.resolve`` filled in its layers and width: the preflight builds them, checks them and
    returns them."""
    f = cfg.ffn_mode
    if f.name == "none":
        return None
    c = f.calib
    return CompressionSettings(
        method=Method.of(instantiate(f.compress, _convert_="all"), f.name),
        layers=tuple(f.layers), mid_dim=f.mid_dim, seed=f.seed, refit=f.refit, refit_ridge=f.refit_ridge, refit_toward=f.refit_toward, budget=f.budget,
        allocation=f.allocation, experts="all" if f.experts == "all" else tuple(f.experts), shared_expert=f.shared_expert,
        re_init_layers=tuple(f.re_init_layers), calib=CalibSettings(c.size, c.seed, c.sequential, c.batch_size, c.source),
        cache_dir=f.cache_dir if f.cache else None,
    )


def fusion_callback(cfg: DictConfig, compression: CompressionSettings, ckpt_path: str | None = None) -> FusionCallback:
    """The callback that compresses with ``compression`` at setup and measures the run's ``approx_metrics``
    (or, from ``ckpt_path``, rebuilds the structure that checkpoint records)."""
    return FusionCallback(compression, OmegaConf.to_container(cfg.approx_metrics, resolve=True), model_identity(cfg.model), ckpt_path)


def build_callbacks(cfg: DictConfig, compression: CompressionSettings | None, ckpt_path: str | None = None) -> list[L.Callback]:
    """Config callbacks, then distillation, then the compression callback (none for ``ffn_mode=none``,
    whose ``compression`` is None).

    Distillation comes first: its ``setup`` copies the uncompressed teacher before the compression
    callback's ``setup`` compresses (Lightning calls callbacks in list order).
    """
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    if cfg.distill.name != "none":
        # a partial called with cfg: passing cfg to instantiate would merge it and break its interpolations
        callbacks.append(instantiate(cfg.distill.callback)(cfg, ckpt_path))
    if compression is not None:
        callbacks.append(fusion_callback(cfg, compression, ckpt_path))
    e = cfg.lm_eval
    if e.enabled and e.before:  # after the compression callback: its setup compresses first
        callbacks.append(LmEvalBeforeTraining(e.tasks, e.seq_lens, e.limit, e.batch_size))
    return callbacks
