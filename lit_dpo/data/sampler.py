"""A shuffling batch sampler that can resume mid-epoch, so a resumed run sees exactly the batches
an uninterrupted run would have seen.

The data module checkpoints this sampler's `state_dict()` (LightningDataModule.state_dict) and
hands it back on resume (`fit ... --ckpt_path last`). A plain shuffled DataLoader restarts its epoch
from the first batch instead, silently repeating some pairs and skipping others.

Each epoch's order is a fixed function of (seed, epoch): no global RNG is touched, so loading data
never shifts the dropout masks either. Under DDP each process takes every `world_size`-th batch of
the same order (the sampler shards itself; the CLI turns Lightning's sampler replacement off).

With `lengths`, batches are length-grouped to cut padding, as transformers' `LengthGroupedSampler`
(`trainer_pt_utils.get_length_grouped_indices`) does: shuffle, cut into mega-batches of up to 50
batches, sort each mega-batch by length, batch. Unlike transformers we then shuffle the batches, so
long and short batches alternate instead of running in sawtooth order, and put the batch holding
the longest pair first (as transformers does), so an out-of-memory batch shows at step 1. The order
stays a pure function of (seed, epoch, lengths). With batch_size 1 there is no padding between
pairs to cut, so the plain shuffle is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
        lengths: Tokens per sample (prompt + longest answer); given, shuffled batches are length-grouped.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True, lengths: Sequence[int] | None = None
    ) -> None:
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = list(lengths) if lengths is not None else None
        self.epoch = 0
        self._yielded = 0  # batches handed out in the current epoch
        self._resume_at = 0  # batches to skip at the start of the next iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle and self.lengths is not None and self.batch_size > 1:
            batches = length_grouped_batches(self.lengths, self.batch_size, generator)
        else:
            order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(self.num_samples)
            batches = [order[i : i + self.batch_size].tolist() for i in range(0, self.num_samples, self.batch_size)]
        rank, world = _world()
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



def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length samples; every index exactly once.

    Args:
        lengths: Tokens per sample.
        batch_size: Samples per batch; a short batch, if any, comes last (as in a plain shuffle).
        generator: Seeded generator; the result depends on its state and `lengths` only.

    Returns:
        Batches of indices, the longest sample in the first batch.
    """
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist()
    # as transformers: up to 50 batches per mega-batch, fewer on small data so there is still mixing
    megabatch = max(1, min(n // (batch_size * 4), 50)) * batch_size
    batches = []
    for start in range(0, n, megabatch):
        # stable sort: equal lengths keep their shuffled order
        chunk = sorted(order[start : start + megabatch], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = [batches.pop()] if len(batches[-1]) < batch_size else []  # only the last mega-batch can be short
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + short
    # the longest sample first, as transformers does, so a batch too big for memory fails at step 1
    longest = max(range(n), key=lambda i: lengths[i])
    where = next(b for b, batch in enumerate(batches) if longest in batch)
    if len(batches[where]) == batch_size:
        batches[0], batches[where] = batches[where], batches[0]
    elif where != 0:  # it sits in the short last batch: swap the sample, keep batch sizes
        batches[where][batches[where].index(longest)], batches[0][0] = batches[0][0], longest
    return batches
