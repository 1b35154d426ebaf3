"""A training DataLoader that resumes exactly where a killed run stopped, mid-epoch.

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


class ResumableTrainData:
    """DataModule mixin: checkpoints how many batches of the current epoch were trained.

    Lightning restores a DataModule's state before it first asks for the training loader, so the
    loader can start at the checkpoint's batch.
    """

    trainer: L.Trainer | None
    _resume_skip: int = 0

    def state_dict(self) -> dict[str, Any]:
        # written at a batch's end: that batch counts as processed (not yet completed)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"batches_done_in_epoch": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_skip = state_dict.get("batches_done_in_epoch", 0)

    def resumable_loader(self, dataset: Any, seed: int, **kwargs: Any) -> ResumableDataLoader:
        """The training loader; its own generator, so making an iterator never draws from dropout's global RNG."""
        skip, self._resume_skip = self._resume_skip, 0
        n_batches = -(-len(dataset) // kwargs["batch_size"])
        skip = skip if 0 < skip < n_batches else 0  # at an epoch's end the next epoch starts afresh
        return ResumableDataLoader(dataset, sampler=EpochSeededSampler(len(dataset), seed), generator=torch.Generator(), skip=skip, **kwargs)


class RNGStateCheckpoint(L.Callback):
    """Saves torch's global RNG state (dropout) in checkpoints and restores it on resume."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
