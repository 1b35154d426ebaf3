"""Loggers: CSV always; W&B offline by default, falling back to offline when its servers are unreachable."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from src.utils.hub import reachable

log = logging.getLogger(__name__)


def wandb_group(cfg: DictConfig) -> str:
    """Every run of a multirun sweep shares one group: the sweep folder's name."""
    if cfg.logger.wandb.group:
        return cfg.logger.wandb.group
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "sweep-" + os.path.basename(HydraConfig.get().sweep.dir)
    return f"{cfg.task.name}-{cfg.model.name}"


def build_loggers(cfg: DictConfig, ffn_mode: Mapping[str, Any]) -> list[Logger]:
    """Instantiate the configured loggers (``logger.csv`` and optionally ``logger.wandb``, whose run config holds
    ``ffn_mode``: the values the run's compression settings resolved, e.g. the layers and mid_dim the config left null)."""
    loggers: list[Logger] = [instantiate(cfg.logger.csv)]
    if "wandb" in cfg.logger:
        from lightning.pytorch.loggers import WandbLogger

        w = cfg.logger.wandb
        online = w.online or os.environ.get("WANDB_MODE") == "online"
        if online and not reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout=3.0):
            log.warning("W&B servers are unreachable: logging offline instead (upload later with `wandb sync %s/wandb`).", cfg.paths.output_dir)
            online = False
        if not online:
            os.environ["WANDB_MODE"] = "offline"
        config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        config["ffn_mode"].update(ffn_mode)
        loggers.append(
            WandbLogger(
                project=w.project, entity=w.entity, name=cfg.run_name, group=wandb_group(cfg), tags=list(w.tags),
                save_dir=cfg.paths.output_dir, offline=not online, config=config,
            )
        )
    return loggers


def close_loggers(loggers: list[Logger]) -> None:
    """Finish W&B runs so the (offline) run is complete on disk when the job returns."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()
