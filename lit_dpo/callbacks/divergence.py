"""DivergenceGuard: the guide's "Problem: Loss diverges", stopped before it spoils the checkpoints.

The guide calls a loss curve "Diverging/increasing" bad and prescribes "Decrease learning_rate by 2x;
Decrease beta to 0.05; Add warmup_steps or increase from 5 to 20". A diverged run only gets worse and,
left alone, overwrites `last.ckpt` with broken weights. So on a NaN/inf step loss, or a smoothed loss
that stays well above its running minimum, this stops training, rolls the trainable weights and
optimizer state back to the last healthy step and leaves them in `last.ckpt` for `--ckpt_path last`.
It also advises on two more curves the guide calls bad: a "Flat" loss ("increase LR or beta") and a
training speed that keeps "Slowing down (possible memory issue)".
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from lit_dpo.callbacks.findings import Finding, step_loss
from lit_dpo.compat import save_last_checkpoint
from lit_dpo.errors import ConfigError

LR_RULE = "Problem: Loss diverges → Decrease learning_rate by 2x"
BETA_RULE = "Problem: Loss diverges → Decrease beta to 0.05"
WARMUP_RULE = "Problem: Loss diverges → Add warmup_steps or increase from 5 to 20"
FLAT_RULE = "LOSS CURVE: ✗ Bad: Flat (increase LR or beta)"
SLOW_RULE = "TRAINING SPEED: ✗ Bad: Slowing down (possible memory issue); ✓ OK if: Slower on first epoch"
GUIDE_BETA, GUIDE_WARMUP = 0.05, 20


@dataclass(frozen=True)
class LossWatch:
    """What the divergence check carries from one optimizer step to the next.

    Args:
        steps: Optimizer steps seen (the hook keeps it equal to `trainer.global_step`).
        recent: The last `window` step losses, oldest first; their median is the smoothed loss.
        best: Running minimum of the smoothed loss from step `min_steps` on; inf before.
        best_step: Step at which `best` was reached.
        streak: Consecutive steps with the smoothed loss above the stop limit.
    """

    steps: int = 0
    recent: tuple[float, ...] = ()
    best: float = math.inf
    best_step: int = 0
    streak: int = 0


class DivergenceGuard(L.Callback):
    """Stop a diverging run and keep its last good weights; advise on a flat loss and a falling speed.

    Divergence, judged on each optimizer step's `train/loss`:

    - a NaN or infinite loss stops training at once;
    - so does a smoothed loss, the median of the last `window` step losses, that stays above
      `max(factor × m, m + min_rise)` for `patience` steps, m being its running minimum since step
      `min_steps`. A median, not a mean or EMA: DPO step losses are right-skewed (one badly ranked pair
      in a small batch is a spike) and a mean follows the spikes. With the defaults, seeded simulations
      of the guide's 2,265-step runs (1–8 pairs per step, step-loss std up to 0.7) never stopped, and a
      loss rising by 0.3 per 50 steps stopped within ~120 steps.

    On a stop, the trainable weights and the optimizer's moments (not its learning rates, which another
    callback may have lowered) go back to the last step whose loss was healthy, and are written over
    ModelCheckpoint's `last.ckpt`. Rolling back rather than blocking ModelCheckpoint's save, because
    ModelCheckpoint runs after every other callback and saves on its own schedule (periodic, after the
    stop's validation, at `on_train_end` if it never saved), and the `last.ckpt` it wrote a few steps
    earlier may already hold bad weights: a step's loss only shows whether the weights *before* it were
    healthy. With the model itself rolled back, every save from the stop on holds good weights.

    Flat: the step losses up to `flat_steps` steps after the LR warm-up (or to the first epoch end with
    at least `flat_steps // 5` of them, if that comes sooner) stay within `flat_band` of the first one; the policy is not leaving the reference (where
    DPO's loss is ln 2 = 0.693). Slowing: over the last `speed_window` steps after `min_steps`, the
    median tokens/s of each quarter is below the one before, `slowdown` lower in all; a slow first epoch
    (initialization) is a rise, not a fall. Both only advise.

    Args:
        window: Step losses whose median is the smoothed loss (100 ≈ 13% of the guide's 755-step epoch).
        factor: Stop when the smoothed loss exceeds this multiple of its running minimum ...
        min_rise: ... and is at least this much (loss units) above it, which matters for low minima.
        patience: Consecutive optimizer steps above that limit before stopping.
        min_steps: Optimizer steps before the running minimum starts; NaN/inf is checked from step 1.
        keep_last_good: Roll back to the last healthy step on a stop. Keeps two CPU copies of the
            trainable weights and optimizer state, refreshed every step: small for LoRA, about 6× the
            model's size for full fine-tuning.
        flat_steps: Optimizer steps after the LR warm-up over which a flat loss is judged, once.
        flat_band: Largest distance from the first step loss that still counts as flat.
        speed_window: Optimizer steps over which a steady fall of tokens/s is judged (≥ 8).
        slowdown: Fraction by which tokens/s must have fallen across the window, e.g. 0.2 = 20%.
    """

    def __init__(self, window: int = 100, factor: float = 1.5, min_rise: float = 0.3, patience: int = 10,
                 min_steps: int = 20, keep_last_good: bool = True, flat_steps: int = 50, flat_band: float = 0.01,
                 speed_window: int = 200, slowdown: float = 0.2) -> None:
        for name, value, ok, need in [
            ("window", window, window >= 1, ">= 1"), ("factor", factor, factor >= 1, ">= 1"),
            ("min_rise", min_rise, min_rise >= 0, ">= 0"), ("patience", patience, patience >= 1, ">= 1"),
            ("min_steps", min_steps, min_steps >= 1, ">= 1"), ("flat_steps", flat_steps, flat_steps >= 2, ">= 2"),
            ("flat_band", flat_band, flat_band > 0, "> 0"), ("slowdown", slowdown, 0 < slowdown < 1, "in (0, 1)"),
            ("speed_window", speed_window, speed_window >= 8, ">= 8, four parts of two steps or more"),
        ]:
            if not ok:
                raise ConfigError(f"DivergenceGuard.{name} must be {need} (got {value}); see --help for the defaults")
        self.window, self.factor, self.min_rise, self.patience = window, factor, min_rise, patience
        self.min_steps, self.keep_last_good = min_steps, keep_last_good
        self.flat_steps, self.flat_band = flat_steps, flat_band
        self.speed_window, self.slowdown = speed_window, slowdown
        # what the run looked like: restored on resume
        self._watch = LossWatch()
        self._last_step = -1
        self._early_losses: list[float] = []  # for the flat check, until it is judged
        self._speeds: list[float] = []  # the last speed_window tokens/s after min_steps
        self._flat: dict[str, Any] | None = None  # {step, flat, seen}
        self._slowing: dict[str, Any] | None = None  # {step, slowing, seen} of the latest check
        self._stopped: dict[str, Any] | None = None  # {step, reason, rolled_back_to, checkpoint} in this run
        self._earlier: list[dict[str, Any]] = []  # stops before a resume
        # in memory only: weights + optimizer state after the last step known good, and after the last step
        self._good: dict[str, Any] | None = None
        self._good_watch = LossWatch()
        self._pending: dict[str, Any] | None = None
        self._context: dict[str, Any] = {}  # config values for the advice; read at each train start

    # -------------------------------------------------------------------------------- decisions
    def limit(self, best: float) -> float:
        """The smoothed loss above which a step counts toward a stop, given the running minimum."""
        return max(best * self.factor, best + self.min_rise)

    def check_divergence(self, losses: Iterable[float],
                         watch: LossWatch | None = None) -> tuple[bool, str | None, LossWatch]:
        """Feed step losses, oldest first, to `watch` (a fresh one if None); stop at the first that diverges.

        Returns:
            (should_stop, reason, watch after the last loss read); nothing after a stop is read.
        """
        watch = watch or LossWatch()
        for loss in losses:
            step = watch.steps + 1
            if not math.isfinite(loss):
                return True, f"train/loss is {loss} at step {step}", replace(watch, steps=step)
            recent = (watch.recent + (float(loss),))[-self.window :]
            smoothed = statistics.median(recent)
            best, best_step, streak = watch.best, watch.best_step, watch.streak
            if step >= self.min_steps:
                streak = streak + 1 if smoothed > self.limit(best) else 0
                if smoothed < best:
                    best, best_step = smoothed, step
            watch = LossWatch(step, recent, best, best_step, streak)
            if streak >= self.patience:
                return True, (f"the smoothed loss (median of the last {len(recent)} steps) has been above "
                              f"{self.limit(best):.4g} for {streak} steps, now {smoothed:.4g}; its running minimum "
                              f"was {best:.4g} at step {best_step} (limit {self.factor:g}× it, at least "
                              f"+{self.min_rise:g})"), watch
        return False, None, watch

    def is_flat(self, losses: Sequence[float]) -> tuple[bool, str]:
        """Whether every step loss stays within `flat_band` of the first one, and what was seen."""
        spread = max(abs(x - losses[0]) for x in losses)
        return spread <= self.flat_band, (f"over the first {len(losses)} steps the loss moved at most {spread:.3g} "
                                          f"from its start {losses[0]:.4f} (flat: within {self.flat_band:g})")

    def is_slowing(self, speeds: Sequence[float]) -> tuple[bool, str]:
        """Whether tokens/s fell steadily over the last `speed_window` values, and what was seen."""
        recent = list(speeds)[-self.speed_window :]
        if len(recent) < 8:
            return False, f"{len(recent)} tokens/s values, 8 needed"
        part = len(recent) // 4
        medians = [statistics.median(recent[i * part : (i + 1) * part]) for i in range(4)]
        drop = 1 - medians[-1] / medians[0] if medians[0] > 0 else 0.0
        falling = all(later < earlier for earlier, later in zip(medians, medians[1:]))
        return falling and drop >= self.slowdown, (
            f"tokens/s over the last {len(recent)} steps, median by quarter: "
            f"{' → '.join(f'{m:.0f}' for m in medians)} "
            f"({-drop:+.0%}; alarm at a steady -{self.slowdown:.0%})")

    # ------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hparams = getattr(pl_module, "hparams", {})
        self._context = {k: hparams.get(k) for k in ("learning_rate", "beta", "warmup_steps")}
        if self.keep_last_good:  # the weights the first step's loss will judge (the restored ones on a resume)
            self._pending, self._good = self._snapshot(trainer, pl_module), None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = step_loss(trainer, self._last_step)
        if loss is None:  # still accumulating
            return
        self._last_step = step = trainer.global_step
        stop, reason, watch = self.check_divergence([loss], replace(self._watch, steps=step - 1))
        if trainer.strategy.reduce_boolean_decision(stop, all=False):  # every process stops if one diverged
            self._stop(trainer, pl_module, watch, reason or "another process saw the loss diverge")
            return
        self._watch = watch
        if self.keep_last_good:
            # this loss came from the weights after the previous step: they are good unless it is high
            if watch.streak == 0 and loss <= self.limit(watch.best):
                self._good, self._good_watch = self._pending, watch
            self._pending = self._snapshot(trainer, pl_module)
        if self._flat is None:
            self._early_losses.append(loss)
            self._check_flat(step, epoch_end=False)
        speed = trainer.callback_metrics.get("train/tokens_per_sec")
        if speed is not None and step >= self.min_steps and not (self._slowing or {}).get("slowing"):
            self._speeds = (self._speeds + [float(speed)])[-self.speed_window :]
            if len(self._speeds) == self.speed_window:
                slowing, seen = self.is_slowing(self._speeds)
                self._slowing = {"step": step, "slowing": slowing, "seen": seen}
                if slowing:
                    rank_zero_warn(f"DivergenceGuard, step {step}: {seen}. The guide: 'Bad: Slowing down (possible "
                                   "memory issue)'; watch memory: a steady increase is a memory leak")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._flat is None:
            self._check_flat(trainer.global_step, epoch_end=True)

    def _check_flat(self, step: int, epoch_end: bool) -> None:
        # Judged on enough steps at full LR: a loss barely moving while the LR still warms up is expected.
        after_warmup = len(self._early_losses) - (self._context.get("warmup_steps") or 0)
        if after_warmup >= self.flat_steps or (epoch_end and after_warmup >= max(2, self.flat_steps // 5)):
            flat, seen = self.is_flat(self._early_losses)
            self._flat, self._early_losses = {"step": step, "flat": flat, "seen": seen}, []
            if flat:
                rank_zero_warn(f"DivergenceGuard, step {step}: {seen}. The guide: 'Bad: Flat (increase LR or beta)': "
                               f"{self._flat_recommendation()}")

    # --------------------------------------------------------------------------------- stopping
    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, watch: LossWatch, reason: str) -> None:
        trainer.should_stop = True
        step = trainer.global_step
        self._stopped = {"step": step, "reason": reason, "rolled_back_to": None, "checkpoint": None}
        self._watch = watch
        if self.keep_last_good and self._good is not None:
            self._restore(trainer, pl_module, self._good)
            self._stopped["rolled_back_to"] = self._good["step"]
            self._watch = replace(self._good_watch, steps=step)  # the smoothing state that goes with those weights
            self._stopped["checkpoint"] = self._save_last(trainer)
        self._good = self._pending = None
        advice = "; ".join(r for r in self._divergence_recommendations().values() if r)
        rank_zero_warn(f"DivergenceGuard: {self._stop_message(self._stopped)} "
                       f"The guide, 'Problem: Loss diverges': {advice}")

    @staticmethod
    def _snapshot(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        def cpu_copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        return {
            "step": trainer.global_step,
            "params": {n: cpu_copy(p) for n, p in pl_module.named_parameters() if p.requires_grad},
            "optimizers": [apply_to_collection(o.state_dict()["state"], torch.Tensor, cpu_copy)
                           for o in trainer.optimizers],
        }

    @staticmethod
    def _restore(trainer: L.Trainer, pl_module: L.LightningModule, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                if name in snapshot["params"]:
                    param.copy_(snapshot["params"][name])
        for optimizer, state in zip(trainer.optimizers, snapshot["optimizers"]):
            # the moments of then with the param groups (learning rates) of now; load_state_dict moves
            # the copy to the parameters' device
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": copy.deepcopy(state), "param_groups": groups})

    @staticmethod
    def _save_last(trainer: L.Trainer) -> str | None:
        """Write the rolled-back state as ModelCheckpoint's last checkpoint; its path, None if it keeps none."""
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or not ckpt.save_last:
            return None
        if ckpt.save_last is True:
            # through ModelCheckpoint's own "last" save (lit_dpo.compat says why), so that neither its periodic
            # save right after this hook nor its save at train end, whose loop state would resume at the *next*
            # epoch, writes over it; and last.ckpt keeps its name.
            return save_last_checkpoint(ckpt, trainer)
        path = ckpt.last_model_path or ckpt.format_checkpoint_name({}, ckpt.CHECKPOINT_NAME_LAST)
        if trainer.is_global_zero and os.path.islink(path):  # save_last="link": it points into the bad stretch
            os.remove(path)
        trainer.save_checkpoint(path, weights_only=ckpt.save_weights_only)
        return path

    # ----------------------------------------------------------------------------------- report
    def _stop_message(self, stop: dict[str, Any]) -> str:
        text = f"stopped at step {stop['step']}: {stop['reason']}."
        if stop["rolled_back_to"] is None:
            why = "" if self.keep_last_good else " (keep_last_good=False)"
            return f"{text} No healthy step to roll back to{why}; start again with the changes below."
        text += (f" Weights and optimizer state were rolled back to step {stop['rolled_back_to']}, "
                 "the last with a healthy loss")
        if stop["checkpoint"] is None:
            return f"{text}; no ModelCheckpoint keeps a last checkpoint, so start again with the changes below."
        return (f"{text}, and saved in {stop['checkpoint']}: resume from there by adding --ckpt_path last "
                "to the same command.")

    def _divergence_recommendations(self) -> dict[str, str]:
        lr, beta, warmup = (self._context.get(k) for k in ("learning_rate", "beta", "warmup_steps"))
        lower_beta, more_warmup = beta is not None and beta > GUIDE_BETA, warmup is not None and warmup < GUIDE_WARMUP
        return {
            LR_RULE: f"model.learning_rate: {lr / 2:g} (was {lr:g})" if lr is not None else "",
            BETA_RULE: f"model.beta: {GUIDE_BETA:g} (was {beta:g})" if lower_beta else "",
            WARMUP_RULE: f"model.warmup_steps: {GUIDE_WARMUP} (was {warmup})" if more_warmup else "",
        }

    def _flat_recommendation(self) -> str:
        lr, beta = self._context.get("learning_rate"), self._context.get("beta")
        return " or ".join(([f"model.learning_rate: {2 * lr:g} (was {lr:g})"] if lr is not None else [])
                           + ([f"model.beta: {2 * beta:g} (was {beta:g})"] if beta is not None else []))

    def findings(self) -> list[Finding]:
        """One finding per guide rule checked: the three divergence remedies, flat loss, falling speed."""
        source, out = type(self).__name__, []
        if self._stopped is not None:
            step, todo = self._stopped["step"], self._divergence_recommendations()
            out.append(Finding(source, LR_RULE, "stop", self._stop_message(self._stopped), todo[LR_RULE], step))
            for rule, key in ((BETA_RULE, "beta"), (WARMUP_RULE, "warmup_steps")):
                done = "" if todo[rule] else f"; {key} is already {self._context.get(key)}"
                out.append(Finding(source, rule, "advice", f"loss diverged at step {step}{done}", todo[rule], step))
        elif self._watch.steps:
            w = self._watch
            seen = f"no divergence: every step loss finite up to step {w.steps}"
            if w.best < math.inf:
                seen += (f"; smoothed loss {statistics.median(w.recent):.4g}, running minimum {w.best:.4g} "
                         f"(stop above {self.limit(w.best):.4g} for {self.patience} steps)")
            seen += "".join(f"; resumed after the stop at step {s['step']}" for s in self._earlier)
            out += [Finding(source, rule, "ok", seen) for rule in (LR_RULE, BETA_RULE, WARMUP_RULE)]
        if self._flat is not None:
            f = self._flat
            out.append(Finding(source, FLAT_RULE, "advice", f["seen"], self._flat_recommendation(), f["step"])
                       if f["flat"] else Finding(source, FLAT_RULE, "ok", f["seen"]))
        if self._slowing is not None:
            s = self._slowing
            out.append(Finding(source, SLOW_RULE, "advice", f"{s['seen']}; watch memory: a steady increase is a leak",
                               "", s["step"]) if s["slowing"] else Finding(source, SLOW_RULE, "ok", s["seen"]))
        return out

    # ------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "watch": {**asdict(self._watch), "recent": list(self._watch.recent)},
            "last_step": self._last_step,
            "early_losses": list(self._early_losses),
            "speeds": list(self._speeds),
            "flat": self._flat,
            "slowing": self._slowing,
            "stops": self._earlier + ([self._stopped] if self._stopped else []),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        watch = state_dict["watch"]
        self._watch = LossWatch(**{**watch, "recent": tuple(watch["recent"])})
        self._last_step = state_dict["last_step"]
        self._early_losses, self._speeds = list(state_dict["early_losses"]), list(state_dict["speeds"])
        self._flat, self._slowing = state_dict["flat"], state_dict["slowing"]
        self._earlier, self._stopped = list(state_dict["stops"]), None  # a resumed run is judged afresh
