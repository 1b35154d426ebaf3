"""Sentence and sentence-pair classification (GLUE and Rotten Tomatoes polarity) as a LightningDataModule."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from omegaconf import DictConfig
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from src.data.base import TaskDataModule, probe_indices
from src.data.files import check_columns, read_task_splits, rotten_tomatoes_corpus, seeded_split
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


def load_rt_polarity(split_seed: int) -> dict[str, pd.DataFrame]:
    """Fresh (1) / rotten (0) snippets, deduplicated by text before a seeded 80/10/10 split."""
    df = rotten_tomatoes_corpus()
    df = df[df.category.isin(["fresh", "rotten"])].drop_duplicates("text").reset_index(drop=True)
    df = pd.DataFrame({"text": df.text, "label": (df.category == "fresh").astype(int)})
    train, val, test = seeded_split(len(df), split_seed)
    return {"train": df.iloc[train], "validation": df.iloc[val], "test": df.iloc[test]}


def load_classification_splits(task: DictConfig) -> dict[str, pd.DataFrame]:
    """All splits the task uses, validated: columns present, labels within the task's range."""
    test_splits = list(task.test_splits.values())
    splits = read_task_splits(task, (lambda: load_rt_polarity(task.split_seed)) if task.source == "rt_polarity" else None)

    for name, df in splits.items():
        where = f"split {name!r}" + (f" in task.data_dir={task.data_dir!r}" if task.data_dir else f" of task {task.name!r}")
        labelled = name not in test_splits or not task.test_labels_hidden
        check_columns(df, list(task.text_fields) + ([task.label_field] if labelled else []), where, "task.text_fields / task.label_field")
        if not labelled and task.label_field not in df.columns:
            continue
        labels = pd.to_numeric(df[task.label_field], errors="coerce")
        if task.num_labels == 1:
            bad = labels.isna()
            allowed = "numbers"
        else:
            ok = labels.isin(range(task.num_labels)) | (~labelled & (labels == -1))
            bad = ~ok
            allowed = f"integers 0..{task.num_labels - 1}" + ("" if labelled else " (or -1 for hidden test labels)")
        if bad.any():
            raise ConfigError(
                f"{where}: column {task.label_field!r} holds {int(bad.sum())} label(s) outside the task's range, "
                f"e.g. {df[task.label_field][bad].tolist()[0]!r}; allowed: {allowed}."
            )
    return splits


class ClassificationDataModule(TaskDataModule):
    """Tokenizes the splits once and serves padded batches; val/test hold one loader per split."""

    def __init__(self, task: DictConfig, tokenizer: PreTrainedTokenizerBase, splits: dict[str, pd.DataFrame], seed: int = 0) -> None:
        super().__init__()
        self.task, self.tokenizer, self.raw, self.seed = task, tokenizer, splits, seed
        self.train_collate = self.eval_collate = DataCollatorWithPadding(tokenizer)
        self.data: dict[str, Dataset] = {}

    def _encode(self, df: pd.DataFrame, limit: int | None) -> Dataset:
        df = df.reset_index(drop=True)
        if limit is not None:
            df = df.iloc[:limit]
        texts = [df[c].astype(str).tolist() for c in self.task.text_fields]
        enc = self.tokenizer(*texts, truncation=True, max_length=self.task.max_seq_length)
        cols: dict[str, Any] = dict(enc)
        cols["idx"] = list(range(len(df)))  # keeps prediction order under DDP's padded sampler
        if self.task.label_field in df.columns:
            dtype = float if self.task.num_labels == 1 else int
            cols["labels"] = pd.to_numeric(df[self.task.label_field]).astype(dtype).tolist()
        return Dataset.from_dict(cols).with_format("torch")

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        t = self.task
        self.data["train"] = self._encode(self.raw[t.train_split], t.max_train_samples)
        for split in [*t.eval_splits.values(), *t.test_splits.values()]:
            if split in self.raw:
                self.data[split] = self._encode(self.raw[split], t.max_eval_samples)

    def probe_batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """``n`` validation samples drawn with ``seed``, padded: the probe set of the NTK metrics."""
        self.setup()
        ds = self.data[next(iter(self.task.eval_splits.values()))]
        return self.eval_collate([{k: v for k, v in ds[i].items() if k != "idx"} for i in probe_indices(len(ds), n, seed)])
