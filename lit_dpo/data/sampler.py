"""A shuffling batch sampler that can resume mid-epoch, so a resumed run sees exactly the batches
an uninterrupted run would have seen.

The data module checkpoints this sampler's `state_dict()` (LightningDataModule.state_dict) and
hands it back on resume (`fit ... --ckpt_path last`). A plain shuffled DataLoader restarts its epoch
from the first batch instead, silently repeating some pairs and skipping others.

Each epoch's order is a fixed function of (seed, epoch): no global RNG is touched, so loading data
never shifts the dropout masks either. Under DDP each process takes every `world_size`-th batch of
the same order (the sampler shards itself; the CLI turns Lightning's sampler replacement off).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches of indices with `set_epoch` and a mid-epoch `state_dict`.

    Args:
        num_samples: Dataset length.
        batch_size: Pairs per batch (per process).
        seed: Shuffling seed; epoch e uses the permutation of `seed + e`.
        shuffle: False keeps dataset order (evaluation).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._yielded = 0  # batches handed out in the current epoch
        self._resume_at = 0  # batches to skip at the start of the next iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> ResumableBatchSampler:
        """This sampler itself. Lightning's fit loop calls `set_epoch` only on `loader.sampler` and
        `loader.batch_sampler.sampler`, never on the batch sampler; without this every epoch would
        replay epoch 0's order."""
        return self

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        rank, world = _world()
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, self.num_samples, self.batch_size)]
        if world > 1:  # equal counts per process keep the collective ops in step
            per_rank = len(batches) // world
            batches = batches[rank : per_rank * world : world]
        return batches

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in self._batches()[start:]:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        # Lightning fetches batches of a sized loader one at a time (no look-ahead), so every batch
        # handed out has been trained on when a checkpoint is written after it.
        return {"epoch": self.epoch, "consumed_batches": self._yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.seed = state.get("seed", self.seed)
        finished_epoch = state["consumed_batches"] >= len(self)
        self._resume_at = 0 if finished_epoch else state["consumed_batches"]

