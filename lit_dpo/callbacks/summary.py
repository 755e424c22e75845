"""RunSummary: a short plain-text account at the end of `fit`, so nobody has to dig through logs
to learn how the run went, where its files are, or how to look at its curves."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class RunSummary(L.Callback):
    """Print final loss, reward accuracy, margins and where the logs and checkpoints are.

    Args:
        write_file: Also save the summary as `summary.txt` beside the run's logs.
    """

    def __init__(self, write_file: bool = True) -> None:
        self.write_file = write_file
        self._started = time.monotonic()
        self._first_loss: float | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._first_loss is None and "train/loss" in trainer.callback_metrics:
            self._first_loss = float(trainer.callback_metrics["train/loss"])

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        text = self.render(trainer)
        print("\n" + text, flush=True)
        if self.write_file and trainer.log_dir:
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.log_dir) / "summary.txt").write_text(text + "\n")

    def render(self, trainer: L.Trainer) -> str:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        minutes, seconds = divmod(int(time.monotonic() - self._started), 60)
        epochs = trainer.fit_loop.epoch_progress.current.completed
        how = "stopped early" if epochs < (trainer.max_epochs or 0) else "finished"
        lines = [
            f"lit_dpo fit {how}: {epochs} epoch(s), {trainer.global_step} optimizer steps, "
            f"{minutes}m{seconds:02d}s",
            "  train: " + _fmt(m, [("loss", "train/loss"), ("epoch loss", "train/loss_epoch"),
                                   ("reward accuracy", "rewards/accuracies"), ("margin", "rewards/margins")]),
        ]
        if self._first_loss is not None:
            lines[-1] += f" (first step loss {self._first_loss:.4f})"
        if "val/loss" in m:
            lines.append("  val:   " + _fmt(m, [("loss", "val/loss"), ("reward accuracy", "val/rewards/accuracies"),
                                              ("margin", "val/rewards/margins"),
                                              ("chosen reward", "val/rewards/chosen"),
                                              ("rejected reward", "val/rewards/rejected")]))
        if trainer.log_dir:
            root = Path(trainer.log_dir).parent.parent
            lines.append(f"  logs:        {trainer.log_dir}  (view: tensorboard --logdir {root})")
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            last = Path(ckpt.dirpath) / "last.ckpt"
            where = last if last.exists() else ckpt.dirpath
            lines.append(f"  checkpoints: {where}  (resume: add --ckpt_path last to the same command)")
        return "\n".join(lines)


def _fmt(metrics: dict[str, float], keys: list[tuple[str, str]]) -> str:
    return ", ".join(f"{label} {metrics[key]:.4f}" for label, key in keys if key in metrics) or "n/a"
