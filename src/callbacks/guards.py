"""Small training-run guards: stop on a non-finite loss, save and stop on SIGTERM/SIGINT, measure step time and peak memory."""

from __future__ import annotations

import resource
import signal
import statistics
import sys
import threading
import time
from typing import Any

import lightning as L
import torch


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class FiniteLossGuard(L.Callback):
    """Stops training at the first non-finite loss, naming the step (no checkpoint is written after it)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise TrainingDiverged(
                f"the training loss is {loss.item()} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx}); training stopped. The last good checkpoint is unchanged; lower optim.lr or check the data."
            )


class PerfMonitor(L.Callback):
    """Logs the median wall time of a training step and the peak memory (``perf/step_time_s``, ``perf/peak_mem_mb``)."""

    def __init__(self, skip_first: int = 2) -> None:
        self.skip_first, self.times, self._t0 = skip_first, [], 0.0
        self.summary_metrics: dict[str, float] = {}  # read into results.json, as every callback's

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)

    def summary(self, device: torch.device) -> dict[str, float]:
        times = self.times[self.skip_first:] or self.times
        out = {"perf/step_time_s": statistics.median(times)} if times else {}
        if device.type == "cuda":
            out["perf/peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:  # peak resident set size of this process (KiB on Linux, bytes on macOS)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["perf/peak_mem_mb"] = rss / (2**20 if sys.platform == "darwin" else 2**10)
        return out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary_metrics = self.summary(trainer.strategy.root_device)
        for logger in trainer.loggers:
            logger.log_metrics(self.summary_metrics, step=trainer.global_step)


class ValidateAtMaxSteps(L.Callback):
    """Runs validation (and so the best-checkpoint bookkeeping) when ``max_steps`` ends training mid-epoch.

    Lightning validates at epoch ends only; a short run (``trainer.max_steps=20``) would otherwise
    end with no validation metric and no best checkpoint. Asking the loop to stop makes it validate.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resume a run that stopped before its epoch's last batch from the next batch.

        Stopping runs the epoch's end, so its checkpoints count the epoch as done, and Lightning would
        resume them at the next epoch's start: a run stopped at ``max_steps=3`` and resumed with
        ``max_steps=5`` skipped the rest of its epoch (or, at ``max_epochs=1``, trained nothing). The
        fix marks the epoch unfinished, as in a checkpoint written mid-epoch; the loop then goes on
        from the batch after the last one trained (the DataModule's loader skips those).
        """
        loop = checkpoint.get("loops", {}).get("fit_loop")
        if not loop or loop["epoch_loop.batch_progress"]["is_last_batch"]:
            return
        epoch = loop["epoch_progress"]
        if epoch["current"]["processed"] < epoch["current"]["ready"]:  # written mid-epoch already
            return
        for progress in (epoch["total"], epoch["current"]):
            progress["processed"] = progress["completed"] = progress["ready"] - 1
        checkpoint["epoch"] = epoch["current"]["processed"]


class RNGStateCheckpoint(L.Callback):
    """Saves torch's global RNG states (dropout: the CPU's and, on a GPU, every CUDA device's) in checkpoints
    and restores them on resume."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda") or []  # a CPU run's checkpoint has none
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class RunInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training; ``last.ckpt`` holds the state to resume from (``ckpt_path=last``)."""

    def __init__(self, signum: int, step: int, path: str | None) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        where = (f"; the state after step {step} is in {path}: resume with ckpt_path=last" if path else
                 " outside a training step; the last checkpoint written stays as it was")
        super().__init__(f"{name} received: training stopped{where}.")


class GracefulStop(L.Callback):
    """On SIGTERM or SIGINT (preemption, ``timeout``, a closed terminal, Ctrl-C), saves ``last.ckpt`` at
    the end of the current training batch and stops the run with ``RunInterrupted``.

    The signal only sets a flag; the save happens at a batch boundary, where the checkpoint's
    mid-epoch position, RNG state and optimizer agree, so the run resumes exactly. The handlers go in
    at ``on_train_start``, after Lightning's own SIGTERM handler: that one would raise a bare
    ``SystemExit`` (exit status 0) at its own points, mid-validation included, with nothing saved.
    Under DDP the ranks agree on the flag (any rank's signal stops all) before anyone saves. SIGUSR1
    (Lightning's SLURM requeue) is left to Lightning.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def _restore(self) -> None:  # before Lightning's teardown restores what it found at fit start
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            path = f"{self.dirpath}/last.ckpt"
            trainer.save_checkpoint(path)  # every rank calls it; rank zero writes
            raise RunInterrupted(self.received or signal.SIGTERM, trainer.global_step, path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
