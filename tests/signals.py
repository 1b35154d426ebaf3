"""A callback that sends its own process a signal at a chosen point of a run (for the signal tests, as config)."""

from __future__ import annotations

import os
import signal
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
