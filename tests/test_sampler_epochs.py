"""Each epoch of a Lightning fit gets its own shuffle: the trainer must reach ResumableBatchSampler.set_epoch.

Found by benchmarks/bench_vs_trl.py: Lightning calls `set_epoch` only on `loader.sampler` and
`loader.batch_sampler.sampler`, so a batch sampler without a `sampler` attribute replayed epoch 0's
order in every epoch.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_dpo.data.sampler import ResumableBatchSampler


class _RecordBatches(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[list[int]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch.tolist())
        return (self.weight * batch.float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fit_shuffles_every_epoch_as_the_sampler_says(tmp_path):
    sampler = ResumableBatchSampler(num_samples=12, batch_size=3, seed=7)
    loader = DataLoader(torch.arange(12), batch_sampler=sampler)
    module = _RecordBatches()
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader)

    expected = {}
    for epoch in range(3):
        reference = ResumableBatchSampler(num_samples=12, batch_size=3, seed=7)
        reference.set_epoch(epoch)
        expected[epoch] = list(reference)
    assert module.seen == expected
    assert expected[0] != expected[1] != expected[2]
