"""Any task as text-to-text for encoder-decoder models (T5, Switch Transformers): the ``seq2seq`` kind.

Generation tasks keep their (source, target) tables (``load_generation_splits``). Classification
tasks (``load_classification_splits``) become tables of a source ``"<task name> <field>: <text> ..."``
(T5's style) and the label's word as target (``task.label_words``, default ``task.label_names``);
splits whose labels are hidden (GLUE's test sets) are left out. Tokenized, batched and grouped by
source as ``GenerationDataModule`` does, except that source and target are separate sequences: the
encoder reads the source (cut to ``max_source_length``, EOS included), the decoder reads the target
shifted right after the start token (the tokenizer's padding token, T5's convention) and the labels are
the target (cut to ``max_target_length``, EOS included unless cut), -100 on padding.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pandas as pd
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from src.data.classification import load_classification_splits
from src.data.generation import GenerationDataModule, check_generation_settings, eos_token_id, load_generation_splits, pad
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


def is_classification(task: DictConfig | dict) -> bool:
    """Whether the task's targets are class labels (its generated words map back to classes)."""
    return task.get("label_field") is not None


def label_words(task: DictConfig | dict) -> list[str]:
    """The target word of each class: ``task.label_words``, else ``task.label_names``, else the class index."""
    words = task.get("label_words") or task.get("label_names") or [str(i) for i in range(task["num_labels"])]
    return [str(w) for w in words]


def load_seq2seq_splits(task: DictConfig) -> dict[str, pd.DataFrame]:
    """(source, target) tables of every split the task uses, validated before any model loads."""
    if not is_classification(task):
        return load_generation_splits(task)
    if task.num_labels == 1:
        raise ConfigError(f"task={task.name} is a regression task: the seq2seq kind (encoder-decoder models) maps generated words "
                          "to classes only; use a classification or generation task.")
    check_generation_settings(task, ("max_source_length", "max_target_length", "max_new_tokens", "num_beams"))
    words = label_words(task)
    if len(words) != task.num_labels or len(set(words)) != len(words):
        raise ConfigError(f"task.label_words={words} must name each of the task's {task.num_labels} classes once.")
    out = {}
    for name, df in load_classification_splits(task).items():
        labels = pd.to_numeric(df[task.label_field]) if task.label_field in df.columns else None
        if labels is None or (labels < 0).all():
            log.warning("split %r of task %s has hidden labels: the seq2seq kind leaves it out (no submission file)", name, task.name)
            continue
        columns = zip(*(df[f].astype(str) for f in task.text_fields))  # "<task name> <field>: <text> <field>: <text>"
        source = [f"{task.name} " + " ".join(f"{f}: {text}" for f, text in zip(task.text_fields, texts)) for texts in columns]
        out[name] = pd.DataFrame({"source": source, "target": [words[int(i)] for i in labels]})
    return out


class Seq2SeqDataModule(GenerationDataModule):
    """Encoder inputs, decoder inputs and labels per (source, target) pair; evaluation batches by unique source."""

    def __init__(self, task: DictConfig, tokenizer: PreTrainedTokenizerBase, splits: dict[str, pd.DataFrame], seed: int = 0) -> None:
        # not GenerationDataModule's __init__: no separator and no shared context to fit source and target into
        L.LightningDataModule.__init__(self)
        self.task, self.tokenizer, self.raw, self.seed = task, tokenizer, splits, seed
        self.eos_token_id = eos_token_id(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.sep: list[int] = []
        self.max_len = self.max_prompt_source = task.max_source_length
        self.data: dict[str, list[dict[str, Any]]] = {}

    def _pair(self, src: list[int], tgt: list[int], counts: dict[str, int]) -> dict[str, list[int]]:
        """Encoder input (source + EOS, at most max_source_length) and labels (target + EOS, at most max_target_length)."""
        t = self.task
        counts["source_cut"] += len(src) >= t.max_source_length
        if len(tgt) < t.max_target_length:
            tgt = tgt + [self.eos_token_id]
        else:
            counts["target_cut"] += 1
            tgt = tgt[: t.max_target_length]
        return {"input_ids": src[: t.max_source_length - 1] + [self.eos_token_id], "labels": tgt}

    def train_collate(self, pairs: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids / attention_mask [B, S], labels [B, T] (-100 on padding) and the decoder's
        inputs [B, T]: the start token, then the labels shifted right."""
        start = self.pad_token_id
        decoder = [[start] + p["labels"][:-1] for p in pairs]
        return {"input_ids": pad([p["input_ids"] for p in pairs], self.pad_token_id),
                "attention_mask": pad([[1] * len(p["input_ids"]) for p in pairs], 0),
                "labels": pad([p["labels"] for p in pairs], -100),
                "decoder_input_ids": pad(decoder, self.pad_token_id),
                "decoder_attention_mask": pad([[1] * len(d) for d in decoder], 0)}

    def eval_collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Every pair of the batch's sources (teacher forcing), plus each source's encoder input once [B, S], to generate from."""
        batch: dict[str, Any] = self.train_collate([p for it in items for p in it["pairs"]])
        prompts = [it["pairs"][0]["input_ids"] for it in items]  # the encoder input: the same for every reference
        batch["prompt_ids"] = pad(prompts, self.pad_token_id)
        batch["prompt_mask"] = pad([[1] * len(p) for p in prompts], 0)
        batch["idx"] = torch.tensor([it["idx"] for it in items])
        batch["sources"] = [it["source"] for it in items]
        batch["references"] = [it["references"] for it in items]
        return batch
