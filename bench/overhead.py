"""Framework overhead: the project's Lightning training step against a bare PyTorch step.

Both sides train the same model (``ClassificationModule.model``, uncompressed) on the same real
batches from the same kind of DataLoader, with AdamW, the linear schedule and gradient clipping.
The Lightning side is ``trainer=cpu`` (or gpu) with the project's callbacks and CSV logger, less
checkpoint writers and the progress bar.

The sides alternate step by step: a callback runs and times one bare step (fetch, to device,
zero_grad, forward, cross-entropy, backward, clipping, AdamW, schedule) after every Lightning step
(before it in every other process, ``bench.timing``). A Lightning step is the time between the
starts of two consecutive Lightning batches less the bare step run in between, so everything
Lightning does per step (fetching, hooks, logging, the optimizer) counts, and a slow spell of a
shared machine hits both sides of a pair. The ratio is reported over several fresh processes.
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
    SIZES,
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
from bench.timing import INTERVAL, Stage, mapped, paired_ratio, rate_summary, ratio_summary, run_stages, timing_record
from src.builders import build_callbacks
from src.modules.classifier import ClassificationModule
from src.utils.loggers import build_loggers

OVERHEAD_TARGET = 5.0  # percent
SKIP = 2  # leading step pairs left out (fresh optimizer state, first logging)
SIDES = ("lightning", "bare")  # even processes' order: the bare step after the Lightning step


class Interleave(L.Callback):
    """Stamps the start of every Lightning step and runs one timed bare step after each (``bare_first``: before each)."""

    def __init__(self, bare_step: Callable[[], None], device: torch.device, bare_first: bool = False) -> None:
        self.bare_step, self.device, self.bare_first = bare_step, device, bare_first
        self.starts: list[float] = []
        self.bare_s: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        if self.bare_first:
            self.bare_s.append(timed(self.bare_step, self.device))
        sync(self.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        if not self.bare_first:
            self.bare_s.append(timed(self.bare_step, self.device))

    def pairs(self) -> tuple[list[float], list[float]]:
        """(Lightning step seconds, bare step seconds) of every step but the last (which has no next start), each bare step
        paired with the Lightning step it ran beside. The time between two starts holds one bare step: the first step's own
        (run after it), or the second's (run before it)."""
        between = self.bare_s[1:] if self.bare_first else self.bare_s
        lightning = [b - a - bare for a, b, bare in zip(self.starts, self.starts[1:], between, strict=False)]
        return lightning, self.bare_s[: len(lightning)]


def run(sizes: Sizes, opts: Options) -> BenchResult:
    """Over ``opts.processes`` fresh processes (``measure``), one ``trainer.fit`` each with a bare step beside every Lightning
    step; compare the pairs."""
    cfg = compose_config(sizes, opts, "none")
    stage = Stage("overhead", "bench.overhead:measure", SIDES, {"sizes": sizes.name, "options": opts.spec()})
    results = run_stages([stage], opts.processes, opts.threads)["overhead"]
    ratio = ratio_summary([paired_ratio(r["lightning_s"], r["bare_s"]) for r in results])
    row = {"model": cfg.model.name, "batch": cfg.task.batch_size, "seq_len": cfg.task.max_seq_length, "steps": len(results[0]["bare_s"]),
           "bare_ms": rate_summary([1e3 * statistics.median(r["bare_s"]) for r in results]),
           "lightning_ms": rate_summary([1e3 * statistics.median(r["lightning_s"]) for r in results]),
           "extra_ms": rate_summary([1e3 * statistics.median(lt - b for lt, b in zip(r["lightning_s"], r["bare_s"], strict=True))
                                     for r in results]),
           "ratio": ratio, "overhead_pct": mapped(ratio, lambda v: 100 * (v - 1))}
    return BenchResult(
        name="overhead",
        title="Framework overhead: Lightning training step vs a bare PyTorch step",
        columns=[("model", "model"), ("batch", "batch"), ("seq_len", "seq len"), ("steps", "step pairs"),
                 ("bare_ms", "bare ms/step"), ("lightning_ms", "Lightning ms/step"), ("extra_ms", "Lightning extra ms/step"),
                 ("overhead_pct", "Lightning slower by %")],
        rows=[row],
        targets=[target("Lightning slower than bare (median over processes), %", row["overhead_pct"]["median"], "<=", OVERHEAD_TARGET)],
        notes=[
            f"Lightning: {cfg.trainer._target_} from conf/trainer ({cfg.trainer.accelerator}, precision {cfg.trainer.precision}, "
            f"gradient_clip_val {cfg.trainer.gradient_clip_val}), callbacks {[type(c).__name__ for c in _callbacks(cfg)]}, "
            "CSV logger; no checkpointing, progress bar or validation.",
            "bare: next(batch) from its own DataLoader over the same batches, to(device), zero_grad, forward, cross-entropy, "
            "backward, clip_grad_norm_, AdamW, schedule; run and timed right after each Lightning step (even processes) or "
            "right before it (odd ones).",
            f"both sides: {precision_note(cfg.trainer.precision)}",
            f"{opts.processes} fresh processes (bench.timing), each one fit of {sizes.overhead_steps} Lightning steps with a bare "
            f"step beside each; the first {SKIP} pairs are left out. Per process: the median over pairs of Lightning step / bare "
            "step; 'slower by' = (that ratio - 1) in percent, the median over processes with its 95 % interval and n "
            f"({INTERVAL}); ms and 'extra' (the median of the differences): median (min to max) over the processes.",
        ],
        settings={"steps": sizes.overhead_steps, "skip": SKIP, "precision": cfg.trainer.precision,
                  "processes": [{k: r[k] for k in ("process", "order", "wall_s", "lightning_s", "bare_s")} for r in results]},
        timing=timing_record(opts.processes, opts.threads),
    )


def measure(order: list[str], process: int, sizes: str, options: dict[str, Any]) -> dict[str, Any]:
    """One timed process (bench.worker): one ``trainer.fit`` with a bare step after every Lightning step, or before it where
    ``order`` puts the bare side first; the paired seconds, the first SKIP pairs left out."""
    sizes_, opts = SIZES[sizes], Options.from_spec(options)
    device = opts.device
    with tempfile.TemporaryDirectory(prefix="mlp-fusion-bench-") as run_dir:  # the CSV logs
        cfg = compose_config(sizes_, opts, "none", output_dir=run_dir)
        torch.manual_seed(cfg.seed)
        module = ClassificationModule(cfg.model, cfg.task, cfg.optim, output_dir=run_dir)
        batches = real_batches(cfg, sizes_.overhead_steps, torch.device("cpu"))  # each side moves its batches to the device
        opt, sched = adamw(module.model, cfg.optim, sizes_.overhead_steps, cfg.trainer.precision)
        bare = _bare_steps(module.model, opt, sched, DataLoader(batches, batch_size=None), cfg.trainer.gradient_clip_val,
                           cfg.trainer.precision, device)
        clock = Interleave(lambda: next(bare), device, bare_first=order[0] == "bare")
        _fit(cfg, module, DataLoader(batches, batch_size=None), clock)
    lightning, bare_s = (side[SKIP:] for side in clock.pairs())
    return {"lightning_s": lightning, "bare_s": bare_s}


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
