"""Turns a composed config into the pieces of a run: data, LightningModule, callbacks, trainer.

Shared by ``src.train``, ``src.approx`` and ``src.export`` so that each entry point stays thin.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import PretrainedConfig

from src import validation
from src.models.build import load_hf_config, load_tokenizer

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
    raise ValueError(f"unknown task kind {kind!r}")


def preflight(cfg: DictConfig) -> tuple[PretrainedConfig, dict[str, Any]]:
    """Every cheap check, in order, before any model weights load: settings, model files, data.

    Returns the model's transformers config and the task's validated data splits. Fills the
    compression defaults (layers, mid_dim) into ``cfg.ffn_mode``.
    """
    validation.check_run_settings(cfg)
    hf = load_hf_config(cfg.model)
    validation.check_architecture(cfg, hf)
    validation.resolve_ffn_mode(cfg, hf)
    validation.resolve_context_length(cfg, hf)
    if "check" in cfg.distill:
        instantiate(cfg.distill.check)(cfg)
    load_splits, _, _ = task_classes(cfg.task.kind)
    splits = load_splits(cfg.task)
    return hf, splits


def build_data_and_module(cfg: DictConfig, splits: dict[str, Any]) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The DataModule (tokenized splits) and the LightningModule (loads the model weights)."""
    _, datamodule_cls, module_cls = task_classes(cfg.task.kind)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = datamodule_cls(cfg.task, tokenizer, splits, seed=cfg.seed)
    module = module_cls(cfg.model, cfg.task, cfg.optim, output_dir=cfg.paths.output_dir)
    return datamodule, module


def build_callbacks(cfg: DictConfig, ckpt_path: str | None = None) -> list[L.Callback]:
    """Config callbacks, then distillation, then the compression callback (none for ``ffn_mode=none``).

    Distillation comes first: its ``setup`` copies the uncompressed teacher before the compression
    callback's ``setup`` compresses (Lightning calls callbacks in list order).
    """
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    if cfg.distill.name != "none":
        # a partial called with cfg: passing cfg to instantiate would merge it and break its interpolations
        callbacks.append(instantiate(cfg.distill.callback)(cfg, ckpt_path))
    if cfg.ffn_mode.name != "none":
        from src.callbacks.fusion import FusionCallback

        callbacks.append(FusionCallback.from_config(cfg, ckpt_path))
    return callbacks
