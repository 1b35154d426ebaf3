"""The task DataModules' base, whose training loader resumes exactly where a killed run stopped.

Each epoch's order is a permutation seeded by (seed, epoch), so it does not depend on what ran
before; after a restart from a mid-epoch checkpoint, the loader skips the batches that the
checkpoint had already trained on, so the resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from src.data import general_text


def probe_indices(size: int, n: int, seed: int) -> list[int]:
    """``min(n, size)`` distinct indices of a split, a seeded sample in increasing order (the probe set)."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=g)[:n].tolist())


class EpochSeededSampler(Sampler[int]):
    """Shuffles with ``randperm`` seeded by ``seed + epoch`` (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """Skips the first ``skip`` batches of its first iteration (the batches a checkpoint already trained on)."""

    def __init__(self, *args: Any, skip: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # skip is an init argument: Lightning re-creates loaders under DDP
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        it = super().__iter__()
        for _ in range(skip):  # the sampler yields the same order as before the kill; drop what was trained
            next(it)
        return it


class TaskDataModule(L.LightningDataModule):
    """Base of the task DataModules: loaders, and how many batches of the current epoch were trained.

    Lightning restores a DataModule's state before it first asks for the training loader, so the
    loader can start at the checkpoint's batch.
    """

    task: Any  # the task config
    data: dict[str, Any]  # split -> tokenized dataset
    seed: int = 0
    _resume_skip: int = 0

    def train_collate(self, items: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def eval_collate(self, items: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        # written at a batch's end: that batch counts as processed (not yet completed)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"batches_done_in_epoch": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_skip = state_dict.get("batches_done_in_epoch", 0)

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded epoch order; after a mid-epoch restart, starts at the checkpoint's batch."""
        dataset, bs = self.data["train"], self.task.batch_size
        skip, self._resume_skip = self._resume_skip, 0
        skip = skip if 0 < skip < -(-len(dataset) // bs) else 0  # at an epoch's end the next epoch starts afresh
        # its own generator: making an iterator must not draw from the global RNG (dropout's)
        return ResumableDataLoader(dataset, sampler=EpochSeededSampler(len(dataset), self.seed), generator=torch.Generator(), skip=skip,
                                   batch_size=bs, collate_fn=self.train_collate, num_workers=self.task.num_workers)

    def calib_batches(self, n: int, seed: int, batch_size: int, source: str = "task") -> list[dict[str, Any]]:
        """``n`` training inputs drawn with ``seed``, collated in batches: the compression's calibration
        sample (docs/methods.md section 6; the probe set comes from the validation split, so they are disjoint).
        ``source="mixed"``: half of them (rounded up) and windows of general text for the rest (``src.data.general_text``)."""
        self.setup()
        train = self.data["train"]
        n_task = n if source == "task" else -(-n // 2)
        idx = probe_indices(len(train), n_task, seed)
        batches = [self.train_collate([train[i] for i in idx[j : j + batch_size]]) for j in range(0, len(idx), batch_size)]
        if source == "mixed":
            texts = general_text.windows(self.tokenizer, n - n_task, seed)
            for j in range(0, len(texts), batch_size):
                batches.append(self.tokenizer.pad({"input_ids": texts[j : j + batch_size]}, return_tensors="pt"))
        return batches

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.data[split], batch_size=self.task.eval_batch_size, collate_fn=self.eval_collate,
                          num_workers=self.task.num_workers, generator=torch.Generator())

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s) for s in self.task.eval_splits.values()]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s) for s in self.task.test_splits.values() if s in self.data]

    @property
    def test_prefixes(self) -> list[str]:
        """Metric prefixes (``test``, ``test_mm``) of the test loaders, in order."""
        return [p for p, s in self.task.test_splits.items() if s in self.data]
