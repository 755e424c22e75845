"""EpochCheckpoints: keep one checkpoint per finished epoch, so shorter-epoch results come for free.

`python -m lit_dpo sweep` adds this to the longest run of an epoch ablation and then evaluates
`epochN.ckpt` as the N-epoch result instead of training N epochs again (exact only when the LR
schedule does not depend on the total number of steps; see docs/sweeps.md). Not a `ModelCheckpoint`:
the CLI's periodic/last checkpointing stays as it is, and these files are never rotated away.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

STEPS_FILE = "epochs.json"


class EpochCheckpoints(L.Callback):
    """Save `epoch{N}.ckpt` after each training epoch (N counted from 1) and the optimizer step it
    ended at in `epochs.json`, beside the run's other checkpoints.

    Args:
        filename: Checkpoint name pattern with `{epoch}` (epochs completed, from 1).
    """

    def __init__(self, filename: str = "epoch{epoch}.ckpt") -> None:
        self.filename = filename

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = checkpoint_dir(trainer)
        epoch = trainer.current_epoch + 1
        trainer.save_checkpoint(directory / self.filename.format(epoch=epoch))  # all ranks: it ends in a barrier
        self._record_step(directory, epoch, trainer.global_step)

    @rank_zero_only
    def _record_step(self, directory: Path, epoch: int, step: int) -> None:
        path = directory / STEPS_FILE
        steps = json.loads(path.read_text()) if path.is_file() else {}
        steps[str(epoch)] = step
        path.write_text(json.dumps(steps, indent=2))


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where the CLI's ModelCheckpoint writes (`<run dir>/checkpoints`)."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
