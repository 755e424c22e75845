"""RunSummary: a short plain-text account at the end of `fit`, plus a PNG of the curves, so nobody has
to dig through logs to learn how the run went, where its files are, or how to look at it.

The curves are read back from the run's own TensorBoard events, so a resumed run's picture covers
the whole run, not just the part after the resume.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lit_dpo.callbacks.diagnosis import epochs_trained, rank_zero_log_dir

# (panel title, [(label, TensorBoard tag)]) — the guide's "what to track": loss curve and accuracy.
PANELS = [
    ("loss", [("train", "train/loss"), ("val", "val/loss")]),
    ("reward accuracy", [("train", "rewards/accuracies"), ("val", "val/rewards/accuracies")]),
    ("reward margin", [("train", "rewards/margins"), ("val", "val/rewards/margins")]),
]


class RunSummary(L.Callback):
    """Print final loss, reward accuracy, margins and where the logs and checkpoints are.

    Args:
        write_file: Also save `summary.txt` and `curves.png` beside the run's logs.
    """

    def __init__(self, write_file: bool = True) -> None:
        self.write_file = write_file
        self._started = time.monotonic()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        curves = _read_curves(trainer.logger)
        text = self.render(trainer, curves)
        print("\n" + text, flush=True)
        log_dir = rank_zero_log_dir(trainer)
        if self.write_file and log_dir:
            run_dir = Path(log_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.txt").write_text(text + "\n")
            if curves.get("train/loss"):
                plot_curves(curves, run_dir / "curves.png", title=str(run_dir))

    def render(self, trainer: L.Trainer, curves: dict[str, list[tuple[int, float]]]) -> str:
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        minutes, seconds = divmod(int(time.monotonic() - self._started), 60)
        epochs = epochs_trained(trainer)
        how = "stopped early" if epochs < (trainer.max_epochs or 0) - 1e-6 else "finished"
        train = _fmt(m, [("loss", "train/loss"), ("epoch loss", "train/loss_epoch"),
                         ("reward accuracy", "rewards/accuracies"), ("margin", "rewards/margins")])
        if curves.get("train/loss"):
            train += f" (first step loss {curves['train/loss'][0][1]:.4f})"
        lines = [
            f"lit_dpo fit {how}: {epochs:.3g} epoch(s), {trainer.global_step} optimizer steps, {minutes}m{seconds:02d}s",
            f"  train: {train}",
        ]
        if "val/loss" in m:
            val = _fmt(m, [("loss", "val/loss"), ("reward accuracy", "val/rewards/accuracies"),
                           ("margin", "val/rewards/margins"), ("chosen reward", "val/rewards/chosen"),
                           ("rejected reward", "val/rewards/rejected")])
            lines.append(f"  val:   {val}")
        log_dir = rank_zero_log_dir(trainer)
        if log_dir:
            root = Path(log_dir).parent.parent
            lines.append(f"  logs:        {log_dir}  (view: tensorboard --logdir {root})")
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            last = Path(ckpt.dirpath) / "last.ckpt"
            where = last if last.exists() else ckpt.dirpath
            lines.append(f"  checkpoints: {where}  (resume: add --ckpt_path last to the same command)")
        return "\n".join(lines)


def _fmt(metrics: dict[str, float], keys: list[tuple[str, str]]) -> str:
    return ", ".join(f"{label} {metrics[key]:.4f}" for label, key in keys if key in metrics) or "n/a"


def _read_curves(logger) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run as [(step, value)], from its TensorBoard event files (all sessions)."""
    if not isinstance(logger, TensorBoardLogger):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> None:
    """Loss, reward accuracy and margin against optimizer step, train and validation, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (name, series) in zip(axes, PANELS):
        for label, tag in series:
            points = curves.get(tag)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if label == "val" else None, markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
