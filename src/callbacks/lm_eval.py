"""lm-evaluation-harness on the compressed model before its first training step (``lm_eval.before=true``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L

from src.evaluation import lm_eval


class LmEvalBeforeTraining(L.Callback):
    """At the start of training (compressed, adapters added, no step taken; not on a resume), the lm-eval tasks as
    ``eval_before/<task>/<metric>``: logged, and in the run's final metrics (``summary_metrics``)."""

    def __init__(self, tasks: Sequence[str], seq_lens: Sequence[int], limit: int | Mapping[str, int] | None,
                 batch_size: int) -> None:
        self.tasks, self.seq_lens, self.limit, self.batch_size = list(tasks), list(seq_lens), limit, batch_size
        self.summary_metrics: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step > 0:  # a resumed run has trained already
            return
        metrics = lm_eval(module.model, trainer.datamodule.tokenizer, self.tasks, self.seq_lens, self.limit, self.batch_size)
        self.summary_metrics = {k.replace("eval/", "eval_before/", 1): v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(self.summary_metrics, step=0)
