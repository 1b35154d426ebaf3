"""Encoder-decoder fine-tuning (T5, Switch Transformers), text-to-text: the ``seq2seq`` task kind.

Batches come from ``src.data.seq2seq.Seq2SeqDataModule``. The loss is the labels' cross-entropy;
validation reports the target perplexity like the causal-LM module. Generation tasks are scored at
test time with the causal-LM module's torchmetrics (SacreBLEU, ROUGE-L, TER, chrF); classification
tasks generate at validation and test, map each generated word back to its class (a word that names
no class counts as a wrong answer, and ``<split>/invalid`` says how often that happened) and report
the task's metrics (``acc``; GLUE's ``f1``, ``mcc``, ``combined_score``), so that ``val/acc`` can pick
the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from src.data.seq2seq import is_classification, label_words
from src.modules.causal_lm import CausalLMModule
from src.modules.classifier import make_metric


def classification_scores(predictions: list[str], references: list[str], words: list[str], metrics: list[str]) -> dict[str, float]:
    """The task's metrics of generated label words against the reference words, plus the share of invalid predictions."""
    index = {w.lower(): i for i, w in enumerate(words)}
    labels = torch.tensor([index[r.lower()] for r in references])
    named = [index.get(p.strip().lower()) for p in predictions]
    # a word that names no class is wrong: any class but the true one
    preds = torch.tensor([i if i is not None else (int(y) + 1) % len(words) for i, y in zip(named, labels)])
    out = {}
    for name in (m for m in metrics if m != "combined_score"):
        metric = make_metric(name, len(words))
        metric.update(preds, labels)
        out[name] = float(metric.compute())
    if "combined_score" in metrics:
        out["combined_score"] = sum(out.values()) / len(out)
    out["invalid"] = sum(i is None for i in named) / len(named)
    return out


class Seq2SeqModule(CausalLMModule):
    """AutoModelForSeq2SeqLM fine-tuning on (source, target) pairs; generated label words scored as classes."""

    head = "seq2seq"

    def __init__(self, model: Any, task: Any, optim: Any, finetune: Any = None, output_dir: str | None = None) -> None:
        super().__init__(model, task, optim, finetune, output_dir=output_dir)
        self.classification = is_classification(self.hparams.task)

    @property
    def probe_fns(self) -> dict[str, Callable]:
        from src.metrics import ntk

        return {"target_loglik": ntk.seq2seq_target_loglik}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
        return self.model(**{k: batch[k] for k in keys}).logits  # [B, T, V]

    def token_nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """NLL of every target token, [N]: decoder position t predicts labels[t] (the decoder's inputs are shifted)."""
        logits, labels = self(batch), batch["labels"]
        keep = labels != -100
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")

    def _eval_step(self, batch: dict[str, Any], prefix: str) -> None:
        # every reference of every source: chunks of eval_batch_size pairs, each cut to its longest source and target
        size = self.hparams.task["eval_batch_size"]
        for start in range(0, batch["input_ids"].shape[0], size):
            rows = slice(start, start + size)
            src, tgt = int(batch["attention_mask"][rows].sum(1).max()), int(batch["decoder_attention_mask"][rows].sum(1).max())
            chunk = {k: batch[k][rows, :src] for k in ("input_ids", "attention_mask")}
            chunk |= {k: batch[k][rows, :tgt] for k in ("labels", "decoder_input_ids", "decoder_attention_mask")}
            self.nll[prefix].update(self.token_nll(chunk))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        if self.classification:  # val/acc (the monitor) needs the generated words
            self._collect_generations(batch, self.eval_prefixes[dataloader_idx])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.classification:
            self._log_generations(self.eval_prefixes, write=False)

    def score(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Classification: the task's metrics of the generated words; generation: the corpus metrics."""
        if not self.classification:
            return super().score(rows)
        t = self.hparams.task
        return classification_scores([r["prediction"] for r in rows], [r["references"][0] for r in rows], label_words(t), list(t["metrics"]))
