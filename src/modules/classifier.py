"""Sentence(-pair) classification and regression (GLUE, Rotten Tomatoes) with GLUE's metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, BinaryF1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from src.modules.base import FineTuneModule
from src.utils.io import write_text

log = logging.getLogger(__name__)


def make_metric(name: str, num_labels: int) -> Metric:
    """GLUE's metric definitions; ``combined_score`` is derived, not a torchmetrics object."""
    return {
        "acc": lambda: Accuracy(task="multiclass", num_classes=max(num_labels, 2)),
        "f1": lambda: BinaryF1Score(),
        "mcc": lambda: MatthewsCorrCoef(task="binary"),
        "pearson": lambda: PearsonCorrCoef(),
        "spearmanr": lambda: SpearmanCorrCoef(),
    }[name]()


class ClassificationModule(FineTuneModule):
    """AutoModelForSequenceClassification fine-tuning; one metric collection per eval/test split."""

    head = "classification"

    def __init__(self, model: Any, task: Any, optim: Any, finetune: Any = None, output_dir: str | None = None) -> None:
        num_labels = task["num_labels"]
        super().__init__(model, task, optim, finetune, num_labels=num_labels, **({"problem_type": "regression"} if num_labels == 1 else {}))
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = 0  # the classification head pools the last non-pad token (GPT-2 style)
        t = self.hparams.task
        self.output_dir = output_dir
        self.regression = num_labels == 1
        base = [m for m in t["metrics"] if m != "combined_score"]
        prefixes = list(t["eval_splits"]) + list(t["test_splits"])
        self.metrics = torch.nn.ModuleDict(
            {p: MetricCollection({m: make_metric(m, num_labels) for m in base}) for p in prefixes}
        )
        self.eval_prefixes: list[str] = list(t["eval_splits"])
        self.test_prefixes: list[str] = list(t["test_splits"])
        self._predictions: dict[str, list[torch.Tensor]] = {}

    @property
    def probe_fns(self) -> dict[str, Callable]:
        from src.metrics import ntk

        if self.regression:
            return {"pred": ntk.regression_pred}
        return {"class0_prob": ntk.class0_prob, "label_logprob": ntk.true_label_logprob}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
        return self.model(**inputs).logits  # [B, num_labels]

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)

    def _preds(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.regression else logits.argmax(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        logits = self(batch)
        labels = batch.get("labels")
        if labels is None or (labels < 0).all():  # hidden test labels: keep predictions for submission files
            self._predictions.setdefault(prefix, []).append(torch.stack([batch["idx"].float(), self._preds(logits).float()], 1))
            return
        self.metrics[prefix].update(self._preds(logits), labels)
        self.log(f"{prefix}/loss", self._loss(logits, labels), batch_size=labels.shape[0], add_dataloader_idx=False, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.eval_prefixes[dataloader_idx])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.trainer.datamodule.test_prefixes[dataloader_idx])

    def _log_metrics(self, prefixes: list[str]) -> None:
        for p in prefixes:
            coll = self.metrics[p]
            if not any(m.update_count for m in coll.values()):
                continue
            values = {k: v.float() for k, v in coll.compute().items()}  # synced across ranks by torchmetrics
            if "combined_score" in self.hparams.task["metrics"]:
                values["combined_score"] = torch.stack(list(values.values())).mean()
            self.log_dict({f"{p}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
            coll.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.eval_prefixes)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_prefixes)
        self._write_submissions()

    def _write_submissions(self) -> None:
        """GLUE submission files (``index<TAB>prediction``) for splits whose labels are hidden."""
        names = self.hparams.task.get("submission_names") or {}
        label_names = self.hparams.task.get("label_names")
        for prefix, chunks in self._predictions.items():
            rows = self.all_gather(torch.cat(chunks)).reshape(-1, 2)  # DDP: every rank's rows
            if self.trainer.is_global_zero and self.output_dir:
                by_idx = {int(i): p for i, p in rows.tolist()}  # dedupes DDP's padded repeats
                fmt = (lambda p: f"{p:.3f}") if self.regression else (lambda p: label_names[int(p)] if label_names else str(int(p)))
                lines = ["index\tprediction"] + [f"{i}\t{fmt(by_idx[i])}" for i in sorted(by_idx)]
                path = Path(self.output_dir) / "predictions" / f"{names.get(prefix) or prefix}.tsv"
                write_text(path, "\n".join(lines) + "\n")
                log.info("test labels are hidden for %s: wrote %d predictions to %s", prefix, len(by_idx), path)
        self._predictions.clear()
