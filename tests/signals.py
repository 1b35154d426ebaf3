"""A process that sends itself a signal at a chosen point: of a training run (``SignalAt``, a callback, as config),
or of another command (``python -m tests.signals <package.module:function> <module> [args]``)."""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import sys
from typing import Any

import lightning as L


class SignalAt(L.Callback):
    """Sends ``sig`` to this process once, at the first ``hook`` call after ``after_step`` optimizer steps."""

    def __init__(self, hook: str, sig: str = "SIGTERM", after_step: int = 2) -> None:
        self.hook, self.sig, self.after_step, self.sent = hook, signal.Signals[sig], after_step, False

    def _maybe(self, hook: str, trainer: L.Trainer) -> None:
        if hook == self.hook and not self.sent and trainer.global_step >= self.after_step:
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe("on_train_batch_start", trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe("on_validation_batch_start", trainer)

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._maybe("on_test_batch_start", trainer)


def signal_at_call(target: str, module: str, sig: str = "SIGTERM") -> None:
    """Run ``python -m <module>`` (its arguments in ``sys.argv``) where each call of ``target`` (``package.module:function``,
    patched where it is defined, before ``module`` imports it) first sends this process ``sig``."""
    owner, function = target.split(":")
    m = importlib.import_module(owner)
    real = getattr(m, function)

    def signalled(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.Signals[sig])
        return real(*args, **kwargs)

    setattr(m, function, signalled)
    runpy.run_module(module, run_name="__main__", alter_sys=True)  # as -m runs it (Hydra finds conf/ from __main__'s file)


if __name__ == "__main__":  # python -m tests.signals src.export.exported:export_onnx src.export ckpt_path=... out=...
    target, module = sys.argv[1:3]
    sys.argv = [module, *sys.argv[3:]]  # the command's own arguments
    signal_at_call(target, module)
