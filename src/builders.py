"""Turns a composed config and what the preflight made of it into the pieces of a run: data, LightningModule,
callbacks (the compression settings to the fusion callback), trainer.

Shared by ``src.train``, ``src.approx`` and ``src.export`` so that each entry point stays thin;
``src.preflight`` checks the config and builds the compression settings before any of these run.
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
from src.models.build import load_tokenizer
from src.models.source import model_identity
from src.modules.kinds import task_classes
from src.pipeline.fuse import apply_spec
from src.pipeline.settings import CompressionSettings
from src.preflight import Checked
from src.utils.checkpoint_io import read_torch_file
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, checked: Checked) -> L.LightningDataModule:
    """The DataModule of the task as the preflight resolved it (``checked.task``) over its validated splits, with the
    model's tokenizer."""
    _, datamodule_cls, _ = task_classes(checked.task.kind)
    return datamodule_cls(checked.task, load_tokenizer(cfg.model), checked.splits, seed=cfg.seed)


def build_data_and_module(cfg: DictConfig, checked: Checked) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The DataModule (tokenized splits) and the LightningModule (loads the model weights)."""
    return build_datamodule(cfg, checked), build_module(cfg, checked.task)


def build_module(cfg: DictConfig, task: DictConfig) -> L.LightningModule:
    """The LightningModule of ``task`` (the preflight's, ``Checked.task``) with the model's weights (a random head
    draws from the global RNG); its checkpoints record ``task``."""
    _, _, module_cls = task_classes(task.kind)
    return module_cls(cfg.model, task, cfg.optim, cfg.finetune, output_dir=cfg.paths.output_dir)


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
        callbacks.append(instantiate(cfg.distill.callback)(cfg, compression, ckpt_path))
    if compression is not None:
        callbacks.append(fusion_callback(cfg, compression, ckpt_path))
    e = cfg.lm_eval
    if e.enabled and e.before:  # after the compression callback: its setup compresses first
        callbacks.append(LmEvalBeforeTraining(e.tasks, e.seq_lens, e.limit, e.batch_size))
    return callbacks
