"""Data-to-text generation (Rotten Tomatoes reviews, E2E, WebNLG) for causal LMs, as a LightningDataModule.

Every split is read into a table of (source, target) pairs; rows with the same source are that
source's references. Training uses every pair; validation and test go by unique source, with all of
its references (perplexity over every pair, generation once per source).

One pair is one causal-LM sequence, ``source | separator | target | EOS``; the labels are -100 on
the source, the separator and the padding, so the loss is on the target tokens only.

Length rule (in tokens, logged at setup): the source is cut to ``max_source_length`` and the target,
EOS included, to ``max_target_length``; a target that was cut gets no EOS, so that the model is not
taught to stop mid-sentence. A pair still longer than ``min(max_seq_length, model positions)`` loses
source tokens first (down to one), then target tokens. Generation prompts are cut so that the
prompt plus ``max_new_tokens`` fits the model's positions. Nothing ever exceeds the model's context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from src.data.base import TaskDataModule, probe_indices
from src.data.files import check_columns, read_task_splits, rotten_tomatoes_corpus, seeded_split
from src.utils.errors import ConfigError

log = logging.getLogger(__name__)


def load_rt_review(split_seed: int) -> dict[str, pd.DataFrame]:
    """(movie + verdict -> critic snippet) pairs: deduplicated snippets, movies split 80/10/10 with a fixed seed.

    Splitting the movies, not the snippets, keeps every movie in one split only.
    """
    df = rotten_tomatoes_corpus()
    df = df[df.category.isin(["fresh", "rotten"])]
    df = df.assign(text=df.text.str.split().str.join(" ")).drop_duplicates("text")  # whitespace-normalised first
    # rows in a seeded random order, so that max_train_samples / max_eval_samples span many movies
    df = df.sample(frac=1.0, random_state=split_seed)
    source = "movie: " + df.movie_name.str.replace("_", " ") + " | verdict: " + df.category
    pairs = pd.DataFrame({"source": source, "target": df.text, "movie": df.movie_name}).reset_index(drop=True)
    movies = np.sort(pairs.movie.unique())
    train, val, test = seeded_split(len(movies), split_seed)
    return {name: pairs[pairs.movie.isin(movies[idx])].reset_index(drop=True) for name, idx in
            [("train", train), ("validation", val), ("test", test)]}


def _texts(cell: Any) -> list[str]:
    """A cell as a list of whitespace-normalised strings: a string is one, a list (or array) several."""
    if cell is None or (np.isscalar(cell) and pd.isna(cell)):
        return []
    items = list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]
    return [" ".join(str(x).split()) for x in items if x is not None]


def to_pairs(df: pd.DataFrame, source_field: str, target_field: str, source_join: str, where: str) -> pd.DataFrame:
    """A split as deduplicated (source, target) rows; a list of targets in one cell gives several rows.

    Raises ConfigError for a missing column, an empty source or an empty reference.
    """
    check_columns(df, [source_field, target_field], where, "task.source_field / task.target_field")
    rows: list[tuple[str, str]] = []
    for i, (src_cell, tgt_cell) in enumerate(zip(df[source_field], df[target_field])):
        source = source_join.join(s for s in _texts(src_cell) if s)
        if not source:
            raise ConfigError(f"{where}: row {i} has an empty source in column {source_field!r}; every example needs a source.")
        targets = _texts(tgt_cell)
        if not targets or not all(targets):
            raise ConfigError(
                f"{where}: row {i} has an empty reference in column {target_field!r} (source {source[:60]!r}); "
                "remove the row or fill in its reference."
            )
        rows.extend((source, t) for t in targets)
    return pd.DataFrame(rows, columns=["source", "target"]).drop_duplicates(ignore_index=True)


def check_generation_settings(task: DictConfig, keys: Sequence[str] = ("max_source_length", "max_target_length", "max_new_tokens",
                                                                      "num_beams", "patience")) -> None:
    """Lengths, beams and patience (``keys``) are positive integers; generation fits the model's context."""
    for key in keys:
        value = task.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"task.{key}={value!r} must be a positive integer.")
    positions = task.get("model_max_positions")
    if positions is not None and task.max_new_tokens >= positions - 1:
        raise ConfigError(
            f"task.max_new_tokens={task.max_new_tokens} leaves no room for a prompt in the model's {positions} positions; "
            f"allowed is 1..{positions - 2}."
        )


def load_generation_splits(task: DictConfig) -> dict[str, pd.DataFrame]:
    """All splits the task uses as validated (source, target) tables, read before any model loads."""
    check_generation_settings(task)
    raw = read_task_splits(task, (lambda: load_rt_review(task.split_seed)) if task.source == "rt_review" else None)
    splits = {}
    for name, df in raw.items():
        where = f"split {name!r}" + (f" in task.data_dir={task.data_dir!r}" if task.data_dir else f" of task {task.name!r}")
        target_field = task.target_field if name == task.train_split else task.eval_target_field or task.target_field
        splits[name] = to_pairs(df, task.source_field, target_field, task.source_join, where)
        if splits[name].empty:
            raise ConfigError(f"{where} has no rows.")
    return splits


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a target: EOS, else SEP (WordPiece tokenizers), else padding."""
    for name in ("eos_token", "sep_token", "pad_token"):
        token_id = getattr(tokenizer, f"{name}_id")
        if token_id is not None:
            if name != "eos_token":
                log.info("tokenizer has no EOS token: targets end with its %s %r", name, getattr(tokenizer, name))
            return token_id
    raise ConfigError("the tokenizer has no EOS, SEP or padding token to end the targets with.")


def pad(seqs: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad lists of ids to one [B, T] tensor, on the right (training) or the left (generation prompts)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs])


class GenerationDataModule(TaskDataModule):
    """Tokenizes the splits once; training batches are pairs, evaluation batches are unique sources."""

    def __init__(self, task: DictConfig, tokenizer: PreTrainedTokenizerBase, splits: dict[str, pd.DataFrame], seed: int = 0) -> None:
        super().__init__()
        self.task, self.tokenizer, self.raw, self.seed = task, tokenizer, splits, seed
        self.eos_token_id = eos_token_id(tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.sep = self._ids([task.separator])[0] if task.separator else []
        positions = task.get("model_max_positions")
        self.max_len = min(task.max_seq_length, positions or task.max_seq_length)  # teacher-forced pair
        # generation prompt: source + separator, leaving max_new_tokens of the model's positions
        self.max_prompt_source = task.max_source_length if positions is None else min(
            task.max_source_length, positions - task.max_new_tokens - len(self.sep))
        if self.max_len < len(self.sep) + 2 or self.max_prompt_source < 1:
            raise ConfigError(
                f"task.max_seq_length={task.max_seq_length} (model positions {positions}) and task.max_new_tokens="
                f"{task.max_new_tokens} leave no room for a source and a target; raise max_seq_length or lower max_new_tokens."
            )
        self.data: dict[str, list[dict[str, Any]]] = {}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _pair(self, src: list[int], tgt: list[int], counts: dict[str, int]) -> dict[str, list[int]]:
        """input_ids and labels of one pair under the length rule of the module docstring."""
        t = self.task
        counts["source_cut"] += len(src) > t.max_source_length
        src = src[: t.max_source_length]
        if len(tgt) < t.max_target_length:
            tgt = tgt + [self.eos_token_id]
        else:
            counts["target_cut"] += 1
            tgt = tgt[: t.max_target_length]
        over = len(src) + len(self.sep) + len(tgt) - self.max_len
        if over > 0:  # source first (keeping one token), then the target
            counts["pair_cut"] += 1
            cut = min(over, max(len(src) - 1, 0))
            src, over = src[: len(src) - cut], over - cut
            tgt = tgt[: len(tgt) - over] if over > 0 else tgt
        prompt = src + self.sep
        return {"input_ids": prompt + tgt, "labels": [-100] * len(prompt) + tgt}

    def _encode(self, df: pd.DataFrame, split: str, grouped: bool, limit: int | None) -> list[dict[str, Any]]:
        """Training: one item per pair. Evaluation: one item per unique source, with every reference."""
        if grouped:
            groups = df.groupby("source", sort=False).target.agg(list)
            groups = groups.iloc[:limit] if limit is not None else groups
            df = groups.explode().reset_index()
        elif limit is not None:
            df = df.iloc[:limit]
        src_ids = self._ids(df.source.tolist())
        tgt_ids = self._ids((" " + df.target).tolist())  # a leading space: the target continues running text
        counts = {"source_cut": 0, "target_cut": 0, "pair_cut": 0}
        pairs = [self._pair(s, t, counts) for s, t in zip(src_ids, tgt_ids)]
        log.info(
            "%s: %d pairs; cut: %d sources (> %d tokens), %d targets (> %d tokens, no EOS), %d pairs (> %d tokens)",
            split, len(pairs), counts["source_cut"], self.task.max_source_length, counts["target_cut"],
            self.task.max_target_length, counts["pair_cut"], self.max_len,
        )
        if not grouped:
            return pairs
        items: dict[str, dict[str, Any]] = {}
        for source, target, s, pair in zip(df.source, df.target, src_ids, pairs):
            if source not in items:
                items[source] = {"idx": len(items), "source": source, "references": [],
                                 "prompt_ids": s[: self.max_prompt_source] + self.sep, "pairs": []}
            items[source]["references"].append(target)
            items[source]["pairs"].append(pair)
        return list(items.values())

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        t = self.task
        log.info(
            "length rule: source <= %d tokens, target <= %d (EOS included; a cut target has no EOS), pair <= %d "
            "(max_seq_length %d, model positions %s): a longer pair loses source tokens first, then target tokens; "
            "prompts leave room for %d new tokens",
            t.max_source_length, t.max_target_length, self.max_len, t.max_seq_length, t.get("model_max_positions"), t.max_new_tokens,
        )
        self.data["train"] = self._encode(self.raw[t.train_split], t.train_split, False, t.max_train_samples)
        for split in [*t.eval_splits.values(), *t.test_splits.values()]:
            if split in self.raw:
                self.data[split] = self._encode(self.raw[split], split, True, t.max_eval_samples)

    def train_collate(self, pairs: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask and labels [B, T]; padding is -100 in the labels."""
        input_ids = pad([p["input_ids"] for p in pairs], self.pad_token_id)
        mask = pad([[1] * len(p["input_ids"]) for p in pairs], 0)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad([p["labels"] for p in pairs], -100)}

    def eval_collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Every pair of the batch's sources (teacher forcing), plus their left-padded prompts [B, S] for generation."""
        batch: dict[str, Any] = self.train_collate([p for it in items for p in it["pairs"]])
        batch["prompt_ids"] = pad([it["prompt_ids"] for it in items], self.pad_token_id, left=True)
        batch["prompt_mask"] = pad([[1] * len(it["prompt_ids"]) for it in items], 0, left=True)
        batch["idx"] = torch.tensor([it["idx"] for it in items])
        batch["sources"] = [it["source"] for it in items]
        batch["references"] = [it["references"] for it in items]
        return batch

    def probe_batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """``n`` validation sources drawn with ``seed``, each with its first reference, padded: the NTK metrics' probe set."""
        self.setup()
        items = self.data[next(iter(self.task.eval_splits.values()))]
        return self.train_collate([items[i]["pairs"][0] for i in probe_indices(len(items), n, seed)])
