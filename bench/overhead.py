"""Framework overhead: the project's Lightning training step against a bare PyTorch step.

Both sides train the same model (``ClassificationModule.model``, uncompressed) on the same real
batches from the same kind of DataLoader, with AdamW, the linear schedule and gradient clipping.
The Lightning side is ``trainer=cpu`` (or gpu) with the project's callbacks and CSV logger, less
checkpoint writers and the progress bar.

The sides alternate step by step: after every Lightning step a callback runs and times one bare
step (fetch, to device, zero_grad, forward, cross-entropy, backward, clipping, AdamW, schedule).
A Lightning step is the time between the starts of two consecutive Lightning batches less the bare
step run in between, so everything Lightning does per step (fetching, hooks, logging, the
optimizer) counts, and a slow spell of a shared machine hits both sides of a pair.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from bench.common import (
    BenchResult,
    Options,
    Sizes,
    adamw,
    compose_config,
    forward_backward,
    optimizer_step,
    precision_note,
    real_batches,
    settings,
    sync,
    target,
    timed,
)
from src.builders import build_callbacks
from src.modules.classifier import ClassificationModule
from src.utils.loggers import build_loggers

OVERHEAD_TARGET = 5.0  # percent
SKIP = 2  # leading step pairs left out (fresh optimizer state, first logging)


class Interleave(L.Callback):
    """Stamps the start of every Lightning step and runs one timed bare step after each."""

    def __init__(self, bare_step: Callable[[], None], device: torch.device) -> None:
        self.bare_step, self.device = bare_step, device
        self.starts: list[float] = []
        self.bare_s: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        self.bare_s.append(timed(self.bare_step, self.device))

    def pairs(self) -> tuple[list[float], list[float]]:
        """(Lightning step seconds, bare step seconds) of every step but the last (which has no next start)."""
        lightning = [b - a - bare for a, b, bare in zip(self.starts, self.starts[1:], self.bare_s, strict=False)]
        return lightning, self.bare_s[: len(lightning)]


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """One ``trainer.fit`` of ``overhead_steps`` steps with a bare step after each; compare the pairs."""
    device = opts.device
    with tempfile.TemporaryDirectory(prefix="mlp-fusion-bench-") as run_dir:  # the CSV logs
        cfg = compose_config(sizes, opts, "none", output_dir=run_dir)
        torch.manual_seed(cfg.seed)
        module = ClassificationModule(cfg.model, cfg.task, cfg.optim, output_dir=run_dir)
        batches = real_batches(cfg, sizes.overhead_steps, torch.device("cpu"))  # each side moves its batches to the device
        opt, sched = adamw(module.model, cfg.optim, sizes.overhead_steps, cfg.trainer.precision)
        bare = _bare_steps(module.model, opt, sched, DataLoader(batches, batch_size=None), cfg.trainer.gradient_clip_val,
                           cfg.trainer.precision, device)
        clock = Interleave(lambda: next(bare), device)
        _fit(cfg, module, DataLoader(batches, batch_size=None), clock)
    lightning, bare_s = (side[SKIP:] for side in clock.pairs())
    ratios = [lt / b for lt, b in zip(lightning, bare_s, strict=True)]

    row = {"model": cfg.model.name, "batch": cfg.task.batch_size, "seq_len": cfg.task.max_seq_length, "steps": len(ratios),
           "bare_ms": 1e3 * statistics.median(bare_s), "lightning_ms": 1e3 * statistics.median(lightning),
           "extra_ms": 1e3 * statistics.median(lt - b for lt, b in zip(lightning, bare_s, strict=True)),
           "overhead_pct": 100 * (statistics.median(ratios) - 1), "ratios": ratios}
    return BenchResult(
        name="overhead",
        title="Framework overhead: Lightning training step vs a bare PyTorch step",
        columns=[("model", "model"), ("batch", "batch"), ("seq_len", "seq len"), ("steps", "step pairs"),
                 ("bare_ms", "bare ms/step"), ("lightning_ms", "Lightning ms/step"), ("extra_ms", "Lightning extra ms/step"),
                 ("overhead_pct", "Lightning slower by %")],
        rows=[row],
        targets=[target("Lightning slower than bare, %", row["overhead_pct"], "<=", OVERHEAD_TARGET)],
        notes=[
            f"Lightning: {cfg.trainer._target_} from conf/trainer ({cfg.trainer.accelerator}, precision {cfg.trainer.precision}, "
            f"gradient_clip_val {cfg.trainer.gradient_clip_val}), callbacks {[type(c).__name__ for c in _callbacks(cfg)]}, "
            "CSV logger; no checkpointing, progress bar or validation.",
            "bare: next(batch) from its own DataLoader over the same batches, to(device), zero_grad, forward, cross-entropy, "
            "backward, clip_grad_norm_, AdamW, schedule; run and timed right after each Lightning step.",
            f"both sides: {precision_note(cfg.trainer.precision)}",
            f"{sizes.overhead_steps} Lightning steps, each followed by a bare step; the first {SKIP} pairs are left out. "
            "'slower by' = median over pairs of (Lightning step / bare step - 1), in percent; 'extra' = median of the differences.",
        ],
        settings={"steps": sizes.overhead_steps, "skip": SKIP, "precision": cfg.trainer.precision, "lightning_s": lightning,
                  "bare_s": bare_s},
    )


def _callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The project's callbacks for this config, less checkpoint writers and progress bars."""
    return [c for c in build_callbacks(cfg, settings(cfg)) if not isinstance(c, (ModelCheckpoint, ProgressBar))]


def _fit(cfg: DictConfig, module: ClassificationModule, loader: DataLoader, clock: Interleave) -> None:
    """One ``trainer.fit`` over ``loader`` with the project's trainer, callbacks and CSV logger."""
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[*_callbacks(cfg), clock], logger=build_loggers(cfg, {}), max_steps=len(loader),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PossibleUserWarning)  # "few dataloader workers", "small logging interval"
        warnings.filterwarnings("ignore", message=".*LeafSpec")  # Lightning 2.6 on torch 2.13's pytree deprecation
        trainer.fit(module, train_dataloaders=loader)


def _bare_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, loader: DataLoader, clip: float, precision: str,
                device: torch.device) -> Iterator[None]:
    """A bare training loop that advances one step per ``next()``."""
    for batch in loader:
        model.zero_grad(set_to_none=True)  # the Lightning step before left its gradients in place
        forward_backward(model, {k: v.to(device) for k, v in batch.items()}, precision)
        optimizer_step(model, opt, sched, clip)
        yield
