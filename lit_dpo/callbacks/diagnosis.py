"""Diagnosis: the end-of-run report of what the watching callbacks saw and what to change next.

Whatever way `fit` ends (all epochs done, plateau stop, a guard's stop, or a crash such as an OOM),
this writes `diagnosis.md` (and the same facts as `diagnosis.json`, for tools such as
`lit_dpo sweep`) beside the run's TensorBoard logs and prints it: which of the guide's rules
were checked and which fired, the recommended next config changes, peak memory and throughput.
The watchers (plateau, oscillation, divergence, memory) only report `Finding`s; the wording of
the report lives here.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lit_dpo.callbacks.findings import Finding, ReportsFindings

_STATUS = {"ok": "ok", "advice": "advice", "action": "acted", "stop": "stopped training"}


class Diagnosis(L.Callback):
    """Write and print `diagnosis.md` (plus `diagnosis.json`) at the end of every fit.

    Args:
        filename: Report file name, written into the run's log directory; the JSON twin takes its
            stem with `.json`.
        print_report: Also print the report to the console.
    """

    def __init__(self, filename: str = "diagnosis.md", print_report: bool = True) -> None:
        self.filename = filename
        self.print_report = print_report
        self._started = time.monotonic()
        self._written = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._written = False

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, exception=None)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._report(trainer, exception=exception)

    @rank_zero_only
    def _report(self, trainer: L.Trainer, exception: BaseException | None) -> None:
        run_dir = rank_zero_log_dir(trainer)
        if self._written or not run_dir:
            return
        self._written = True
        findings = [f for cb in trainer.callbacks if isinstance(cb, ReportsFindings) for f in cb.findings()]
        facts = {
            "ending": describe_ending(trainer, findings, exception),
            "findings": findings,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            "peak_memory_gb": peak_memory_gb(),
            "minutes": (time.monotonic() - self._started) / 60,
        }
        text = render(**facts)
        path = Path(run_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        facts.update(findings=[asdict(f) for f in findings], crashed=exception is not None)
        path.with_suffix(".json").write_text(json.dumps(facts, indent=2))
        if self.print_report:
            print(f"\n{text}\n(saved to {path})", file=sys.stdout, flush=True)


def rank_zero_log_dir(trainer: L.Trainer) -> str | None:
    """`trainer.log_dir` as process 0 sees it, without `trainer.log_dir`'s broadcast.

    For code that runs on process 0 only (`rank_zero_only`, or after one process crashed): the broadcast
    is a collective, and the other processes never join it, so under DDP it would hang or fail.
    Process 0 is the broadcast's source, so the value is the same.
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir


def epochs_trained(trainer: L.Trainer) -> float:
    """Epochs of training done, fractional when a run stopped mid-epoch (from optimizer steps)."""
    batches = trainer.num_training_batches
    if not batches or batches == float("inf"):
        return float(trainer.current_epoch)
    return trainer.global_step / -(-int(batches) // trainer.accumulate_grad_batches)  # ceil: a last partial window steps


def describe_ending(trainer: L.Trainer, findings: list[Finding], exception: BaseException | None) -> str:
    """One sentence on how fit ended."""
    epochs = epochs_trained(trainer)
    where = f"after {epochs:.3g} of {trainer.max_epochs} epoch(s), {trainer.global_step} optimizer steps"
    if exception is not None:
        return f"Crashed with {type(exception).__name__}: {str(exception).splitlines()[0][:200] if str(exception) else ''} ({where})."
    stops = [f for f in findings if f.kind == "stop"]
    if stops:
        return f"Stopped by {stops[0].source} {where}: {stops[0].message}"
    if trainer.max_epochs and epochs < trainer.max_epochs - 1e-6:
        return f"Stopped early {where}."
    return f"Finished {where}."


def peak_memory_gb() -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU), in GB of 2**30
    bytes (as nvidia-smi and MemoryGuard count)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux


def render(ending: str, findings: list[Finding], metrics: dict[str, float], peak_memory_gb: float, minutes: float) -> str:
    """The report as Markdown: ending, recommended changes, rule-by-rule table, resources."""
    lines = ["# lit_dpo run diagnosis", "", ending, ""]
    changes = [f for f in findings if f.kind != "ok" and f.recommendation]
    lines.append("## Recommended next changes")
    lines.append("")
    if changes:
        lines += [f"- `{f.recommendation}` — {f.rule} ({f.source}: {f.message})" for f in changes]
    else:
        lines.append("- none: no rule of the guide fired; keep this configuration.")
    lines += ["", "## The guide's rules, as checked in this run", "", "| rule | status | what was seen | step |",
              "|---|---|---|---|"]
    for f in findings:
        step = "" if f.step is None else str(f.step)
        lines.append(f"| {_cell(f.rule)} | {_STATUS[f.kind]} ({f.source}) | {_cell(f.message)} | {step} |")
    if not findings:
        lines.append("| (no watching callbacks were active) | | | |")
    lines += ["", "## Final metrics and resources", ""]
    for label, key in [("train loss", "train/loss"), ("train loss (epoch mean)", "train/loss_epoch"),
                       ("val loss", "val/loss"), ("val reward accuracy", "val/rewards/accuracies"),
                       ("val reward margin", "val/rewards/margins"), ("tokens/s (last step)", "train/tokens_per_sec")]:
        if key in metrics:
            lines.append(f"- {label}: {metrics[key]:.4f}")
    lines.append(f"- peak memory: {peak_memory_gb:.2f} GB ({'GPU allocated' if torch.cuda.is_available() else 'process RSS'})")
    lines.append(f"- wall time of fit: {minutes:.1f} min")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
