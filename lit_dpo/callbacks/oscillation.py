"""OscillationDetector: the guide's "Loss oscillates → decrease learning_rate", done for the user.

The guide's loss curve should be a "smooth downward trend"; "Oscillating (reduce LR)" is listed as bad,
and its LEARNING RATE section says "If oscillating → decrease LR" and "reduce by 2x". Per-step DPO
losses are noisy by nature (around 0.69 with a std of 0.01–0.03 at batch 8), so the detector looks
for a *regular* up-and-down swing that stands well above that noise, not for "the loss went up".
On detection it halves every param group's learning rate (floored at `min_lr`), including the
scheduler's base LRs so the warm-up/decay schedule does not undo it, and the reduction survives a
resume through the optimizer and scheduler state in the checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_dpo.callbacks.findings import Finding, step_loss
from lit_dpo.errors import ConfigError

LR_RULE = "Loss oscillates → Decrease learning_rate"
ACCUMULATION_RULE = "Loss oscillates → Increase gradient_accumulation"
BETA_RULE = "BETA: If loss oscillates → decrease to 0.05"
GUIDE_BETA = 0.05
# what a resumed run must remember, as the private attributes `_<name>`
_STATE = ("losses", "last_step", "resume_at", "checks", "peak", "detections", "lr_changes")


@dataclass(frozen=True)
class Swing:
    """The most regular swing in a window of step losses (see `measure_swing`).

    Args:
        ratio: RMS of the swing the sinusoid adds to the trend fit, divided by `noise`.
        period: Optimizer steps per up-and-down cycle of the best-fitting sinusoid.
        amplitude: Half the peak-to-peak height of that swing over the window, in loss units.
        noise: Std of what neither trend nor swing explains: the step-to-step noise.
        reversals: Times the fitted curve (trend + swing) turns from falling to rising or back.
    """

    ratio: float
    period: float
    amplitude: float
    noise: float
    reversals: int


@lru_cache(maxsize=8)
def _projections(n: int, max_period: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares hat matrices for a quadratic trend [n, n] and for trend + one sinusoid per
    candidate frequency [F, n, n], the residual degrees of freedom [F] and the periods [F]."""
    t = (np.arange(n) - (n - 1) / 2) / n
    trend = np.stack([np.ones(n), t, t * t], axis=1)  # quadratic: DPO's fast-then-slow decrease is no swing
    # Periods from 2 steps (zig-zag) to max_period, 8 frequencies per periodogram bin: a coarser grid
    # misses a period-3 swing by enough phase over the window to lose a third of its ratio.
    count = int(8 * n * (0.5 - 1 / max_period)) + 2
    omegas = np.unique(np.linspace(2 * math.pi / max_period, math.pi, count))
    hats, dofs = [], []
    for w in omegas:
        x = np.concatenate([trend, np.cos(w * n * t)[:, None], np.sin(w * n * t)[:, None]], axis=1)
        hats.append(x @ np.linalg.pinv(x, rcond=1e-10))  # at period 2 the sine column is all zeros
        dofs.append(n - np.linalg.matrix_rank(x, tol=1e-8))
    return trend @ np.linalg.pinv(trend), np.stack(hats), np.array(dofs, dtype=float), 2 * math.pi / omegas


def measure_swing(losses: Sequence[float], max_period: float = 6.0) -> Swing:
    """Fit a quadratic trend plus the single sinusoid (period 2…max_period) that explains the most.

    The swing is what the sinusoid adds to the trend-only fit; `ratio` compares its RMS with the std
    of the remaining residual, i.e. an F-test for a periodic component, maximised over frequency.
    """
    y = np.asarray(losses, dtype=float)
    n = len(y)
    trend_hat, hats, dofs, periods = _projections(n, float(max_period))
    fits = hats @ y  # [F, n]
    swings = fits - trend_hat @ y
    swing_rms = np.sqrt((swings**2).mean(axis=1))
    noise = np.sqrt(((y - fits) ** 2).sum(axis=1) / dofs)
    tiny = 1e-9 * max(float(np.abs(y).max()), 1e-12)  # float round-off on an exactly smooth curve
    ratio = np.where(swing_rms > tiny, swing_rms / np.maximum(noise, tiny), 0.0)
    best = int(ratio.argmax())
    steps = np.diff(fits[best])
    signs = np.sign(steps[np.abs(steps) > tiny])
    return Swing(
        ratio=float(ratio[best]),
        period=float(periods[best]),
        amplitude=float(np.ptp(swings[best]) / 2),
        noise=float(noise[best]),
        reversals=int((signs[1:] != signs[:-1]).sum()),
    )


class OscillationDetector(L.Callback):
    """Detect a regularly oscillating step loss and decrease the learning rate, as the guide says.

    The statistic (`measure_swing`), over the last `window` optimizer-step losses: fit a quadratic
    trend, then the trend plus the one sinusoid with period 2…`max_period` steps that explains most.
    The loss oscillates when both hold:

    - the swing's RMS is at least `min_swing_to_noise` × the std of what is left (the step noise).
      A sinusoid of amplitude A has RMS A/√2, so the default 2.5 means a swing of about ±3.5× the
      noise (a ±2.5σ zig-zag). Over 100 000 windows of 20 i.i.d. Gaussian or Student-t losses around a
      falling trend, and with a 25σ spike every 50 steps, the largest ratio seen was 2.3 (a spike
      spreads over all frequencies: ≈ 0.4); a swing of ±5σ with period 2–6 steps reaches 2.5 in
      96–100 % of windows.
    - the fitted curve (the lightly smoothed loss) turns at least `min_reversals` times: the loss
      really goes up and down instead of descending in bumps. A smooth decrease turns 0 times; the
      default 4 is two full swings. Sign changes of the raw first difference cannot tell oscillation
      from noise (i.i.d. noise flips it on 2 steps of 3), hence the fit.

    On detection it warns with the guide's advice and, with `action="reduce_lr"`, multiplies every
    param group's peak learning rate by `factor` (never below `min_lr`): the optimizer's current LR
    and the scheduler's `base_lrs`, since `LambdaLR` recomputes `lr = base_lr * schedule(step)` each
    step. Then it waits `cooldown_steps` and a fresh `window` of post-change losses before judging again.
    `reduce_lr` is the default because it is the guide's fix, false alarms are rare (above) and
    cost one halving within the floor, while a run left oscillating wastes its whole budget.

    Args:
        action: `reduce_lr` follows the guide ("If oscillating → decrease LR"); `warn` only advises.
        window: Optimizer steps judged at once; ≥ 2 × max_period + 4, so two full swings fit.
        max_period: Longest swing, in optimizer steps, that counts as oscillation; slower waves are
            left to the trend.
        min_swing_to_noise: Swing RMS / step-noise std at which the loss counts as oscillating.
        min_reversals: Turns of the fitted curve the window must show (4 = two up-and-down swings).
        factor: Learning-rate multiplier per detection; 0.5 is the guide's "reduce by 2x".
        cooldown_steps: Optimizer steps after a detection before the next one may act.
        min_lr: Floor for the peak learning rate; the guide calls 1e-5 "very conservative".
    """

    def __init__(
        self,
        action: Literal["warn", "reduce_lr"] = "reduce_lr",
        window: int = 20,
        max_period: float = 6.0,
        min_swing_to_noise: float = 2.5,
        min_reversals: int = 4,
        factor: float = 0.5,
        cooldown_steps: int = 20,
        min_lr: float = 1e-5,
    ) -> None:
        name = "OscillationDetector"
        if action not in ("warn", "reduce_lr"):
            raise ConfigError(f"{name}.action must be 'warn' or 'reduce_lr' (got {action!r})")
        if not max_period >= 2:
            raise ConfigError(f"{name}.max_period must be >= 2 steps, a zig-zag (got {max_period})")
        if window < 2 * max_period + 4:
            raise ConfigError(f"{name}.window must be >= 2 * max_period + 4 = {math.ceil(2 * max_period + 4)} "
                              f"so two full swings fit (got {window}); 20 is the default")
        if not (min_swing_to_noise >= 0 and min_reversals >= 0):
            raise ConfigError(f"{name}.min_swing_to_noise and min_reversals must be >= 0 "
                              f"(got {min_swing_to_noise}, {min_reversals}); defaults 2.5 and 4")
        if not 0 < factor < 1:
            raise ConfigError(f"{name}.factor must be in (0, 1) (got {factor}); the guide halves: 0.5")
        if cooldown_steps < 0 or not min_lr >= 0:
            raise ConfigError(f"{name}.cooldown_steps and min_lr must be >= 0 (got {cooldown_steps}, {min_lr})")
        self.action = action
        self.window = window
        self.max_period = max_period
        self.min_swing_to_noise = min_swing_to_noise
        self.min_reversals = min_reversals
        self.factor = factor
        self.cooldown_steps = cooldown_steps
        self.min_lr = min_lr
        # what the run looked like: restored on resume
        self._losses: list[float] = []
        self._last_step = -1
        self._resume_at = 0  # first step at which a new detection may act
        self._checks = 0  # windows judged
        self._peak = 0.0  # largest swing ratio seen
        self._detections: list[dict[str, Any]] = []  # {"step", "reason"}
        self._lr_changes: list[dict[str, Any]] = []  # {"step", "old", "new"}: peak LR of the first group
        self._context: dict[str, Any] = {}  # current config values for the advice; re-read each run

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action, window=self.window)

    # --------------------------------------------------------------------------------- decision
    def detect(self, losses: Sequence[float]) -> tuple[bool, str]:
        """Whether the last `window` step losses oscillate, and why (see the class docstring)."""
        if len(losses) < self.window:
            return False, f"{len(losses)} steps seen, {self.window} needed to judge"
        window = losses[-self.window :]
        if not all(math.isfinite(x) for x in window):
            return False, "non-finite loss in the window: divergence, not oscillation"
        return self._judge(measure_swing(window, self.max_period))

    def _judge(self, swing: Swing) -> tuple[bool, str]:
        times = f"{swing.ratio:.1f}×" if swing.ratio < 1000 else "over 1000×"
        seen = (f"the loss swings ±{swing.amplitude:.3g} every {swing.period:.1f} steps, {times} the "
                f"step noise {swing.noise:.2g} (oscillation from {self.min_swing_to_noise}×)")
        if swing.ratio < self.min_swing_to_noise:
            return False, seen
        if swing.reversals < self.min_reversals:
            return False, (f"{seen}, but turns only {swing.reversals} times (needs {self.min_reversals}): "
                           "a bumpy descent")
        return True, f"{seen}, turning {swing.reversals} times in {self.window} steps"

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hparams = getattr(pl_module, "hparams", {})
        self._context = {
            "learning_rate": hparams.get("learning_rate"),
            "beta": hparams.get("beta"),
            "accumulate": trainer.accumulate_grad_batches,
            "batch_size": getattr(trainer.datamodule, "batch_size", None),
        }

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = step_loss(trainer, self._last_step)
        if loss is None:  # still accumulating
            return
        self._last_step = step = trainer.global_step
        self._losses = (self._losses + [loss])[-self.window :]
        if step < self._resume_at or len(self._losses) < self.window:
            return
        if not all(math.isfinite(x) for x in self._losses):
            return  # a NaN/inf loss is divergence: the divergence guard's business
        swing = measure_swing(self._losses, self.max_period)
        self._checks += 1
        self._peak = max(self._peak, swing.ratio)
        oscillating, reason = self._judge(swing)
        # every process applies the same LR change, or the replicas would drift apart
        if trainer.strategy.reduce_boolean_decision(oscillating, all=False):
            self._act(trainer, step, reason)

    def _act(self, trainer: L.Trainer, step: int, reason: str) -> None:
        self._detections.append({"step": step, "reason": reason})
        self._losses = []  # judge the next window on losses after the change only
        self._resume_at = step + self.cooldown_steps
        done = "the learning rate is unchanged (action=warn)"
        if self.action == "reduce_lr":
            changes = self._scale_learning_rates(trainer)
            if changes:
                old, new = changes[0]
                self._lr_changes.append({"step": step, "old": old, "new": new})
                done = f"multiplied the learning rate by {self.factor}: {old:.3g} → {new:.3g}"
            else:
                done = f"the learning rate is already at the floor min_lr={self.min_lr:g}"
        for logger in trainer.loggers:
            logger.log_metrics({"train/oscillations": len(self._detections),
                                "train/lr_reductions": len(self._lr_changes)}, step=step)
        rank_zero_warn(f"OscillationDetector, step {step}: {reason}; {done}. The guide, 'Problem: Loss oscillates': "
                       f"{self._advice()}")

    def _scale_learning_rates(self, trainer: L.Trainer) -> list[tuple[float, float]]:
        """Multiply each param group's peak LR by `factor`, floored at `min_lr`; (old, new) per changed group."""
        changes: list[tuple[float, float]] = []
        scheduled: set[int] = set()
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            base_lrs = getattr(scheduler, "base_lrs", None)
            if base_lrs is None:  # e.g. ReduceLROnPlateau keeps no base: its groups are scaled below
                continue
            for i, group in enumerate(scheduler.optimizer.param_groups):
                scheduled.add(id(group))
                new = self._reduced(base_lrs[i])
                if new is None:
                    continue
                changes.append((base_lrs[i], new))
                group["lr"] *= new / base_lrs[i]  # keeps the schedule's position: lr = base_lr * schedule(step)
                base_lrs[i] = new
                if "initial_lr" in group:  # what a scheduler rebuilt from the optimizer would start from
                    group["initial_lr"] = new
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if id(group) not in scheduled and (new := self._reduced(group["lr"])) is not None:
                    changes.append((group["lr"], new))
                    group["lr"] = new
        return changes

    def _reduced(self, lr: float) -> float | None:
        # The floor applies to the peak LR, not the scheduled one, which passes 0 during warm-up and decay.
        new = max(lr * self.factor, self.min_lr)
        return new if new < lr * (1 - 1e-9) else None

    # --------------------------------------------------------------------------------- report
    def _advice(self) -> str:
        lr, beta, accumulate = (self._context.get(k) for k in ("learning_rate", "beta", "accumulate"))
        batch = self._context.get("batch_size")
        return (f"decrease learning_rate (model.learning_rate={_fmt(lr)}); increase gradient_accumulation "
                f"(trainer.accumulate_grad_batches={_fmt(accumulate)}); might be batch size too large "
                f"(data.batch_size={_fmt(batch)}); BETA: if loss oscillates → decrease to 0.05 "
                f"(model.beta={_fmt(beta)})")

    def findings(self) -> list[Finding]:
        """One finding per guide rule: ok if no window oscillated, else what was done and what to change."""
        source, rules = type(self).__name__, (LR_RULE, ACCUMULATION_RULE, BETA_RULE)
        if not self._detections:
            seen = (f"no oscillation in {self._checks} windows of {self.window} steps; the largest regular swing was "
                    f"{self._peak:.1f}× the step noise (oscillation from {self.min_swing_to_noise}×)" if self._checks
                    else f"not judged: the run had fewer than {self.window} optimizer steps after any change")
            return [Finding(source, rule, "ok", seen) for rule in rules]

        first = self._detections[0]["step"]
        when = "loss oscillated at step(s) " + ", ".join(str(d["step"]) for d in self._detections)
        seen = f"{when}: {self._detections[-1]['reason']}"
        lr, beta, accumulate, batch = (self._context.get(k)
                                       for k in ("learning_rate", "beta", "accumulate", "batch_size"))
        if self._lr_changes:
            kind, new = "action", self._lr_changes[-1]["new"]
            lr = lr if lr is not None else self._lr_changes[0]["old"]
            seen += f"; lit_dpo lowered the learning rate {len(self._lr_changes)}× to {new:.3g}"
        else:
            kind, new = "advice", max(lr * self.factor, self.min_lr) if lr is not None else None
            why = "action=warn" if self.action == "warn" else f"at the floor min_lr={self.min_lr:g}"
            seen += f"; learning rate left unchanged ({why})"
        return [
            Finding(source, LR_RULE, kind, seen,
                    f"model.learning_rate: {new:.3g} (was {lr:.3g})" if new is not None and new < lr else "", first),
            Finding(source, ACCUMULATION_RULE, "advice",
                    f"{when}; the guide also says 'Might be batch size too large' (data.batch_size={_fmt(batch)})",
                    f"trainer.accumulate_grad_batches: {2 * accumulate} (was {accumulate})" if accumulate else "",
                    first),
            Finding(source, BETA_RULE, "advice",
                    when + (f"; beta is already {beta:g}" if beta and beta <= GUIDE_BETA else ""),
                    f"model.beta: {GUIDE_BETA:g} (was {beta:g})" if beta and beta > GUIDE_BETA else "", first),
        ]

    # ---------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy({name: getattr(self, f"_{name}") for name in _STATE})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in _STATE:
            setattr(self, f"_{name}", copy.deepcopy(state_dict[name]))


def _fmt(value: Any) -> str:
    return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
