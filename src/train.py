"""Fine-tune a (compressed) language model: ``python -m src.train [group=option ...] [key=value ...]``."""

from __future__ import annotations

import logging
import signal
import sys
import time

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from src.builders import build_callbacks, build_data_and_module, build_trainer
from src.callbacks.guards import GracefulStop, RunInterrupted, TrainingDiverged
from src.evaluation import lm_eval
from src.pipeline.settings import CompressionSettings
from src.preflight import Checked, preflight, resolve_ckpt_path
from src.utils.checkpoint_io import StreamingCheckpointIO
from src.utils.config import run_app  # importing it registers the config resolvers and schema
from src.utils.errors import ConfigError
from src.utils.io import write_json
from src.utils.loggers import build_loggers, close_loggers
from src.utils.memory import release_memory

log = logging.getLogger(__name__)


@rank_zero_only
def write_results(cfg: DictConfig, status: str, compression: CompressionSettings | None, **fields: object) -> None:
    """``results.json`` in the run folder: the status (running, completed, interrupted, failed), the compression
    (``compression``: None for ``ffn_mode=none`` and for a run the preflight refused) and final metrics."""
    c = compression
    summary = {"task": cfg.task.name, "model": cfg.model.name, "ffn_mode": cfg.ffn_mode.name,
               **(c.resolved() if c else {"mid_dim": None, "layers": None}),
               "distill": cfg.distill.name, "finetune": cfg.finetune.name, "seed": cfg.seed, "monitor": cfg.task.monitor,
               # the options that make a variant of a method (the report tells them apart)
               **(c.variant() if c else {})}
    write_json(f"{cfg.paths.output_dir}/results.json", {"status": status, **summary, **fields})


def _raise_if_signalled(trainer: L.Trainer, stop: GracefulStop | None) -> None:
    """A signal that arrived where nothing acted on it (the last validation or test batch) still stops the run."""
    signum = (stop.received if stop is not None else None) or (signal.SIGTERM if trainer.received_sigterm else None)
    if signum is not None:
        raise RunInterrupted(signum, trainer.global_step, None)


def drop_training_state(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Free what only fine-tuning used, before testing: Lightning keeps the optimizer after ``fit``
    (AdamW's two states, twice the trainable parameters' size; teardown even moves them from a GPU to
    host memory) and the last step's gradients, while loading the best checkpoint for the test reads
    another copy of the weights and of those states."""
    trainer.strategy.optimizers = []
    trainer.strategy.lr_scheduler_configs = []
    module.zero_grad(set_to_none=True)
    release_memory()


def train(cfg: DictConfig) -> dict[str, float]:
    """Check everything cheap, compress (in the fusion callback's setup), fine-tune, test.

    ``results.json`` follows the run: running, then completed, or interrupted or failed with what stopped
    it, which is raised on.
    """
    compression = None
    try:
        checked = preflight(cfg)
        compression = checked.compression
        ckpt_path = resolve_ckpt_path(cfg, compression)
        write_results(cfg, "running", compression)
        metrics, seconds = _fit_and_test(cfg, checked, ckpt_path)
    except BaseException as e:
        said = isinstance(e, (RunInterrupted, ConfigError, TrainingDiverged))  # their message is the one sentence to record
        write_results(cfg, "interrupted" if isinstance(e, RunInterrupted) else "failed", compression,
                      error=str(e) if said else f"{type(e).__name__}: {e}")
        raise
    write_results(cfg, "completed", compression, metrics=metrics, wall_time_s=seconds)
    return metrics


def _fit_and_test(cfg: DictConfig, checked: Checked, ckpt_path: str | None) -> tuple[dict[str, float], float]:
    """The run after the preflight (``checked``): its metrics and the seconds it took."""
    compression = checked.compression
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_data_and_module(cfg, checked)
    callbacks = build_callbacks(cfg, compression, ckpt_path)
    loggers = build_loggers(cfg, compression.resolved() if compression else {})
    trainer = build_trainer(cfg, module, callbacks, logger=loggers, plugins=[StreamingCheckpointIO()])
    start = time.time()
    stop = next((cb for cb in callbacks if isinstance(cb, GracefulStop)), None)
    try:
        if cfg.train:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            drop_training_state(trainer, module)
        else:  # evaluate: the validation splits too, so that train=false gives the metrics before any step
            trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path)
        _raise_if_signalled(trainer, stop)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if cfg.test:
            best = trainer.checkpoint_callback.best_model_path if cfg.train and trainer.checkpoint_callback else None
            for res in trainer.test(module, datamodule=datamodule, ckpt_path=best):
                metrics.update({k: float(v) for k, v in res.items()})
        _raise_if_signalled(trainer, stop)
    except SIGTERMException:  # Lightning's own handler, outside training (sanity check, test): a bare SystemExit(None)
        raise RunInterrupted(signal.SIGTERM, trainer.global_step, None) from None
    if cfg.lm_eval.enabled:  # on the tested (best) weights, as they are in memory
        evals = lm_eval(module.model, datamodule.tokenizer, cfg.lm_eval.tasks, cfg.lm_eval.seq_lens, cfg.lm_eval.limit, cfg.lm_eval.batch_size)
        for logger in trainer.loggers:  # the CSV and W&B, beside the run's other metrics (Lightning has finalized them)
            logger.log_metrics(evals, step=trainer.global_step)
            logger.save()
        metrics.update(evals)
    for cb in callbacks:
        metrics.update(getattr(cb, "summary_metrics", {}))
    if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_score is not None:
        metrics[f"best/{cfg.task.monitor}"] = float(trainer.checkpoint_callback.best_model_score)
    close_loggers(trainer.loggers)
    return metrics, time.time() - start


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)  # it records the status in results.json
    except RunInterrupted as e:
        log.error("%s", e)
        sys.exit(128 + e.signum)  # as the shell reports a process ended by the signal: a scheduler sees a failure
    except (ConfigError, TrainingDiverged) as e:
        log.error("%s", e)
        sys.exit(2 if isinstance(e, ConfigError) else 3)
    log.info("final metrics: %s", {k: round(v, 4) for k, v in metrics.items() if k.startswith(("test", "best", "fusion/params"))})
    return metrics.get(cfg.task.monitor)  # for Hydra sweepers that optimise


if __name__ == "__main__":
    run_app(main)  # a value of the wrong type (seed=abc), refused while composing: one sentence, exit code 2
