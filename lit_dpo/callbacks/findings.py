"""What a watching callback reports: one `Finding` per guide rule it checked, in the guide's words.

The Diagnosis callback gathers the findings of every callback that has a `findings()` method and
turns them into the end-of-run report, so each watcher only has to say what it saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Kind = Literal["ok", "advice", "action", "stop"]
"""ok: checked, not triggered; advice: told the user; action: lit_dpo changed something (e.g. halved
the LR); stop: training was stopped."""


@dataclass(frozen=True)
class Finding:
    """One rule of the hyperparameter guide, as a callback saw it in this run.

    Args:
        source: The callback that reports it, e.g. "OscillationDetector".
        rule: The guide's rule, quoted, e.g. "Loss oscillates → decrease LR".
        kind: ok / advice / action / stop (see `Kind`).
        message: What was seen, with the numbers, e.g. "loss fell 0.2% over the last 3 epochs".
        recommendation: The config change to make next, e.g. "trainer.max_epochs: 2"; empty if none.
        step: Optimizer step at which it was seen, if any.
    """

    source: str
    rule: str
    kind: Kind
    message: str
    recommendation: str = ""
    step: int | None = None


@runtime_checkable
class ReportsFindings(Protocol):
    """A callback whose observations belong in the run's diagnosis."""

    def findings(self) -> list[Finding]: ...


def step_loss(trainer, last_step: int, key: str = "train/loss") -> float | None:
    """The loss of the optimizer step that just finished, once per step; None while accumulating.

    Call from `on_train_batch_end` with the step you last saw; DPOModule logs `train/loss` for a whole
    accumulation window right before the optimizer steps, so it is current here.
    """
    if trainer.global_step == last_step or key not in trainer.callback_metrics:
        return None
    return float(trainer.callback_metrics[key])
