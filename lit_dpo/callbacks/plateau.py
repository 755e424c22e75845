"""PlateauEarlyStopping: the guide's "Stop when loss plateaus", with the epoch the plateau began.

The guide (NUM_TRAIN_EPOCHS, COMMON MISTAKES) asks to monitor the loss across epochs, stop once it
plateaus, and pick the next run's epochs from where it did: "If plateaued by epoch 2 → use 2 epochs",
"If still significantly decreasing at epoch 3 → use 5 epochs". Lightning's `EarlyStopping` needs an
absolute `min_delta` and says neither when the plateau began nor what to change; this one judges a
relative improvement of an optionally smoothed value, keeps `best.ckpt`, and reports `findings()`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_dpo.callbacks.findings import Finding, step_loss
from lit_dpo.errors import ConfigError

PLATEAU_RULE = "MISTAKE 5: Ignoring convergence → Stop when loss plateaus; If plateaued by epoch 2 → use 2 epochs"
DECREASING_RULE = "If still significantly decreasing at epoch 3 → use 5 epochs"
EARLY_RULE = ("Problem: Loss plateaus early → Increase num_train_epochs; Try slightly higher learning_rate; "
              "Consider increasing beta")
BETA_LADDER = (0.05, 0.1, 0.2)  # the guide's betas; MISTAKE 2: "Keep beta in 0.05 - 0.2 range"
MAX_LEARNING_RATE = 1e-4  # the guide's "Aggressive"; MISTAKE 1: 2e-4 is an SFT learning rate


class PlateauEarlyStopping(EarlyStopping):
    """Stop when the monitored loss improves by less than `min_delta` (relative) for `patience` checks.

    A subclass of `EarlyStopping` because Lightning calls only EarlyStopping and checkpoint callbacks
    after `LightningModule.on_train_epoch_end`, where DPOModule logs `train/loss_epoch`. It overrides
    EarlyStopping's public hooks and state only; the decision is `decide`, a pure method.

    Args:
        monitor: Metric to watch: `val/loss` (after each validation), `train/loss_epoch` (after each
            epoch), or the per-step `train/loss` with `check_on="steps"`.
        mode: `min` for losses, `max` for accuracies and margins.
        min_delta: Smallest relative improvement that counts, e.g. 0.01 = the smoothed value must get 1%
            better than the best before the window.
        patience: Checks in a row without such an improvement before stopping.
        window: Checks the improvement is measured over (1 = against the best before this check).
        check_on: `epoch`: once per epoch (per validation for `val/*`); `steps`: every
            `check_every_n_steps` optimizer steps, on the mean of the monitor over those steps.
        check_every_n_steps: Optimizer steps per check when `check_on="steps"`.
        smoothing: EMA factor in [0, 1) applied to the checked values before judging; 0 = raw values,
            0.6 is TensorBoard-like, higher reacts later but ignores more noise.
        min_epochs: Never stop before this many epochs have finished, so epoch-1 noise cannot end a run.
        min_progress: For a loss monitor, the relative fall from the first step's `train/loss` needed
            before a stop counts as a plateau; below it the curve is flat (never left the start), where
            stopping does not help and the guide says "increase LR or beta". 0 disables.
        save_best: Save `best.ckpt` (trainable weights only, for validate/test/export) in the run's
            checkpoint directory each time the smoothed value reaches a new best.
        verbose: Log the verdict of every check, not only the stop.

    Attributes:
        history: One entry per check: epoch (1-based), step, value, smoothed, improvement (None when
            there was nothing to compare with yet).
        plateau_start_epoch: First epoch of the window over which the improvement fell below min_delta.
        stopped_epoch: 1-based epoch during which this callback stopped training; 0 if it did not.
        best_model_path: Where `best.ckpt` was written, "" until then.
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.01,
        patience: int = 1,
        window: int = 1,
        check_on: Literal["epoch", "steps"] = "epoch",
        check_every_n_steps: int = 50,
        smoothing: float = 0.0,
        min_epochs: int = 2,
        min_progress: float = 0.01,
        save_best: bool = True,
        verbose: bool = False,
    ) -> None:
        _validate(monitor, mode, min_delta, patience, window, check_on, check_every_n_steps, smoothing, min_epochs,
                  min_progress)
        super().__init__(monitor=monitor, mode=mode, patience=patience, verbose=verbose, check_finite=False)
        self.min_delta = min_delta  # relative, unlike EarlyStopping's absolute (and sign-flipped) one
        self.window = window
        self.check_on = check_on
        self.check_every_n_steps = check_every_n_steps
        self.smoothing = smoothing
        self.min_epochs = min_epochs
        self.min_progress = min_progress
        self.save_best = save_best
        self.best_score = math.inf if mode == "min" else -math.inf
        self.history: list[dict[str, Any]] = []
        self.start_value: float | None = None  # first step's train/loss: a plateau needs progress from here
        self.plateau_start_epoch: int | None = None
        self.best_model_path = ""
        self._step_sum, self._step_count, self._last_step = 0.0, 0, 0  # check_on="steps" accumulator
        self._batches_done = 0  # training batches of the current epoch, as Lightning counts them (resumes too)
        self._judge_at_epoch_end = True  # set in setup
        self._run: dict[str, Any] = {}  # max_epochs and the module's learning_rate / beta, for findings()

    # ------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor.startswith("val/") and trainer.limit_val_batches == 0:
            raise ConfigError(f"PlateauEarlyStopping monitors {self.monitor} but validation is off "
                              "(trainer.limit_val_batches=0); enable it or monitor train/loss_epoch")
        # val/* is current at train-epoch end only if validation ran just before it, as in EarlyStopping
        val_each_epoch = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
        self._judge_at_epoch_end = not self.monitor.startswith("val/") or val_each_epoch
        hparams = getattr(pl_module, "hparams", {})
        self._run = {"max_epochs": trainer.max_epochs, "learning_rate": hparams.get("learning_rate"),
                     "beta": hparams.get("beta")}

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An epoch cut short (stopped or interrupted) has no epoch value yet; a resume finishes it.
        if self.check_on == "epoch" and self._judge_at_epoch_end and self._epoch_finished(trainer) \
                and not _skip(trainer):
            self._check(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.check_on == "epoch" and not self._judge_at_epoch_end and not _skip(trainer):
            self._check(trainer)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches_done = batch_idx + 1  # Lightning's batch index within the epoch continues on a resume
        if self.start_value is None and self.min_progress and self.mode == "min" and "train/loss" in trainer.callback_metrics:
            self.start_value = float(trainer.callback_metrics["train/loss"])  # the loss before any learning
        if self.check_on != "steps" or trainer.global_step == self._last_step:
            return  # still accumulating gradients: no new optimizer step
        value = step_loss(trainer, self._last_step, key=self.monitor)
        if value is None:
            self._metric(trainer)  # raises: the monitor is not logged per step
        self._last_step = trainer.global_step
        self._step_sum, self._step_count = self._step_sum + value, self._step_count + 1
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer, self._step_sum / self._step_count)
            self._step_sum, self._step_count = 0.0, 0

    def _check(self, trainer: L.Trainer, value: float | None = None) -> None:
        """Judge the current value (the logged monitor unless given), agree across processes, act."""
        if trainer.fast_dev_run:
            return
        epoch_done = self._epoch_finished(trainer)
        previous_best = self.best_score
        should_stop, reason = self.decide(
            self._metric(trainer) if value is None else value, epoch=trainer.current_epoch + 1,
            step=trainer.global_step, completed_epochs=trainer.current_epoch + int(epoch_done))
        # Every rank must take part in save_checkpoint (it ends in a barrier), so agree on "improved" first.
        if self.save_best and trainer.strategy.reduce_boolean_decision(self.best_score != previous_best, all=False):
            self._save_best(trainer)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch + 1
            self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
            self.stopping_reason_message = reason
            rank_zero_info(f"{reason} Best checkpoint: {self.best_model_path or 'not saved (save_best=False)'}")
        elif reason and self.verbose:
            rank_zero_info(reason)

    # --------------------------------------------------------------------------------- decision
    def decide(self, current: Any, epoch: int | None = None, step: int | None = None,
               completed_epochs: int | None = None) -> tuple[bool, str | None]:
        """Record one checked value and decide whether training should stop.

        Args:
            current: The monitored value at this check (float or 0-d tensor).
            epoch: 1-based epoch the check belongs to; defaults to one check per epoch.
            step: Optimizer step of the check, for the report.
            completed_epochs: Epochs fully finished at this check (for `min_epochs`); defaults to `epoch`.

        Returns:
            (should_stop, reason): the verdict and one sentence explaining it with the numbers.
        """
        value = float(current)
        epoch = len(self.history) + 1 if epoch is None else epoch
        completed = epoch if completed_epochs is None else completed_epochs
        if not math.isfinite(value):
            return False, f"{self.monitor} = {value} at epoch {epoch} is not finite: not a plateau, not judged here."
        smoothed = value  # EMA, started at the first value
        if self.history:
            smoothed = self.smoothing * self.history[-1]["smoothed"] + (1 - self.smoothing) * value
        improvement = None
        if len(self.history) >= self.window:
            earlier = [h["smoothed"] for h in self.history[: len(self.history) - self.window + 1]]
            improvement = self._relative_improvement(min(earlier) if self.mode == "min" else max(earlier), smoothed)
        if (smoothed < self.best_score) if self.mode == "min" else (smoothed > self.best_score):
            self.best_score = smoothed
        self.history.append({"epoch": epoch, "step": step, "value": value, "smoothed": smoothed,
                             "improvement": improvement})
        where = f"{self.monitor} = {value:.4f} (smoothed {smoothed:.4f}) at epoch {epoch}"
        if improvement is None:
            return False, f"{where}: nothing to compare with yet."
        if improvement >= self.min_delta:
            self.wait_count, self.plateau_start_epoch = 0, None
            return False, f"{where}: improvement {improvement:+.2%} >= min_delta {self.min_delta:.2%}."
        self.wait_count += 1
        if self.wait_count == 1:
            self.plateau_start_epoch = self.history[-1 - self.window]["epoch"]
        flat = (f"{where}: improvement {improvement:+.2%} over {self.window} check(s) < min_delta {self.min_delta:.2%},"
                f" {self.wait_count} check(s) in a row; the plateau began at epoch {self.plateau_start_epoch}.")
        if self.wait_count < self.patience:
            return False, f"{flat} Patience {self.patience}."
        if completed < self.min_epochs:
            return False, f"{flat} Not stopping before min_epochs={self.min_epochs}."
        if self.start_value is not None:
            progress = self._relative_improvement(self.start_value, self.best_score)
            if progress < self.min_progress:  # never left the start: stopping would not help, LR/beta would
                return False, (f"{flat} Not stopping: {progress:+.2%} from the first step's loss "
                               f"{self.start_value:.4f} is a flat curve, not a converged one (guide: 'Bad: Flat "
                               "(increase LR or beta)').")
        return True, f"{flat} Stopping: the loss has plateaued."

    def _relative_improvement(self, reference: float, current: float) -> float:
        gain = reference - current if self.mode == "min" else current - reference
        return gain / abs(reference) if reference else gain  # relative to 0 is undefined: use the absolute change

    # ---------------------------------------------------------------------------------- helpers
    def _epoch_finished(self, trainer: L.Trainer) -> bool:
        # As Lightning's epoch loop decides it: the last batch, or as many as trainer.limit_train_batches allows.
        return trainer.is_last_batch or self._batches_done == trainer.num_training_batches

    def _metric(self, trainer: L.Trainer) -> float:
        logs = trainer.callback_metrics
        if self.monitor not in logs:
            hint = " (check_on='steps' needs a per-step metric such as train/loss)" if self.check_on == "steps" else ""
            raise ConfigError(f"PlateauEarlyStopping: monitor '{self.monitor}' is not logged{hint}; "
                              f"available: {', '.join(sorted(logs)) or 'none yet'}")
        return float(logs[self.monitor])

    def _save_best(self, trainer: L.Trainer) -> None:
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            directory = Path(checkpoint.dirpath)
        else:
            directory = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = directory / "best.ckpt"
        trainer.save_checkpoint(path, weights_only=True)  # DPOModule keeps only trainable weights: small
        self.best_model_path = str(path)

    def _best_entry(self) -> dict[str, Any] | None:
        return next((h for h in self.history if h["smoothed"] == self.best_score), None)

    # ----------------------------------------------------------------------------------- report
    def findings(self) -> list[Finding]:
        """What this run showed about convergence, one Finding per guide rule checked."""
        def finding(rule: str, kind: str, message: str, recommendation: str = "", step: int | None = None) -> Finding:
            return Finding("PlateauEarlyStopping", rule, kind, message, recommendation, step)

        if len(self.history) < 1 + self.window:
            return [finding(PLATEAU_RULE, "ok", f"{len(self.history)} check(s) of {self.monitor}: too few to judge")]
        last, max_epochs = self.history[-1], self._run.get("max_epochs")
        max_epochs = max_epochs if max_epochs and max_epochs > 0 else None  # -1 / None: bounded by max_steps
        was = f" (was {max_epochs})" if max_epochs else ""
        best = self._best_entry()
        kept = f"; best {self.monitor} {best['smoothed']:.4f} at epoch {best['epoch']}" if best else ""
        kept += f", kept in {self.best_model_path}" if self.best_model_path else ""
        if self.wait_count < self.patience:  # no plateau at the end of the run
            out = [finding(PLATEAU_RULE, "ok", f"no plateau: {self.monitor} never missed min_delta {self.min_delta:.2%}"
                           f" {self.patience} check(s) in a row; {last['improvement']:+.2%} at the last, epoch "
                           f"{last['epoch']}{kept}"),
                   finding(EARLY_RULE, "ok", "no early plateau")]
            if last["improvement"] >= self.min_delta and (max_epochs is None or last["epoch"] >= max_epochs):
                epochs = 3 if last["epoch"] < 3 else max(5, last["epoch"] + 2)  # guide: 3 default, 5+ if still falling
                out.append(finding(DECREASING_RULE, "advice", f"{self.monitor} still fell {last['improvement']:.2%} "
                                   f"at epoch {last['epoch']}, the last", f"trainer.max_epochs: {epochs}{was} — still "
                                   f"decreasing at epoch {last['epoch']}", last["step"]))
            else:
                out.append(finding(DECREASING_RULE, "ok", "not still falling significantly at the end"))
            return out
        start = self.plateau_start_epoch
        stopped = bool(self.stopped_epoch) and (max_epochs is None or self.stopped_epoch < max_epochs)
        epochs = max(start, 2)  # MISTAKE 3: "num_train_epochs = 1" is wrong, so never advise fewer than 2
        out = [finding(PLATEAU_RULE, "stop" if stopped else "advice",
                       f"{self.monitor} improved less than {self.min_delta:.2%} for {self.wait_count} check(s): the "
                       f"plateau began at epoch {start}" + (f"; stopped after epoch {self.stopped_epoch}" if stopped else "")
                       + kept, f"trainer.max_epochs: {epochs}{was}" if not max_epochs or epochs < max_epochs else "",
                       last["step"])]
        if start <= 2:
            first = self.history[0]["smoothed"]
            out.append(finding(EARLY_RULE, "advice", f"{self.monitor} plateaued from epoch {start} after changing "
                               f"{self._relative_improvement(first, last['smoothed']):.1%} from its first value "
                               f"{first:.4f}; if that is higher than wanted, more epochs alone stay on the plateau: "
                               "try slightly higher learning_rate, consider increasing beta",
                               self._early_plateau_fix(), last["step"]))
        else:
            out.append(finding(EARLY_RULE, "ok", f"plateau only from epoch {start}"))
        return [*out, finding(DECREASING_RULE, "ok", "the loss plateaued")]

    def _early_plateau_fix(self) -> str:
        changes = []
        lr, beta = self._run.get("learning_rate"), self._run.get("beta")
        if lr and lr < MAX_LEARNING_RATE:  # guide: "If loss converges too slowly → increase LR by 2x"
            changes.append(f"model.learning_rate: {min(2 * lr, MAX_LEARNING_RATE):g} (was {lr:g})")
        higher = [b for b in BETA_LADDER if beta and b > beta]
        if higher:
            changes.append(f"model.beta: {higher[0]:g} (was {beta:g})")
        return "; ".join(changes)

    # ------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_score": self.best_score, "best_model_path": self.best_model_path,
                "wait_count": self.wait_count, "plateau_start_epoch": self.plateau_start_epoch,
                "stopped_epoch": self.stopped_epoch, "stopping_reason_message": self.stopping_reason_message,
                "steps": (self._step_sum, self._step_count, self._last_step), "start_value": self.start_value}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.start_value = state_dict.get("start_value")
        self.best_score, self.best_model_path = state_dict["best_score"], state_dict["best_model_path"]
        self.wait_count, self.plateau_start_epoch = state_dict["wait_count"], state_dict["plateau_start_epoch"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.stopping_reason_message = state_dict["stopping_reason_message"]
        self._step_sum, self._step_count, self._last_step = state_dict["steps"]


def _skip(trainer: L.Trainer) -> bool:
    # as EarlyStopping: judge only while fitting, never on the sanity check's values
    return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking


def _validate(monitor: str, mode: str, min_delta: float, patience: int, window: int, check_on: str,
              check_every_n_steps: int, smoothing: float, min_epochs: int, min_progress: float) -> None:
    def fail(message: str) -> None:
        raise ConfigError(f"PlateauEarlyStopping: {message}")

    if mode not in ("min", "max"):
        fail(f"mode must be 'min' (losses) or 'max' (accuracies), got {mode!r}")
    if not (math.isfinite(min_delta) and 0 <= min_delta < 1):
        fail(f"min_delta is a relative improvement in [0, 1), e.g. 0.01 for 1%; got {min_delta}")
    if patience < 1 or window < 1 or min_epochs < 0 or not 0 <= min_progress < 1:
        fail(f"patience and window must be >= 1, min_epochs >= 0 and min_progress in [0, 1); "
             f"got {patience}, {window}, {min_epochs}, {min_progress}")
    if not 0 <= smoothing < 1:
        fail(f"smoothing is an EMA factor in [0, 1) (0 = off, 0.6 typical); got {smoothing}")
    if check_on not in ("epoch", "steps"):
        fail(f"check_on must be 'epoch' or 'steps', got {check_on!r}")
    if check_on == "steps" and (check_every_n_steps < 1 or monitor.startswith("val/")):
        fail(f"check_on='steps' averages a per-step metric (e.g. train/loss) over check_every_n_steps >= 1 steps; "
             f"got {monitor}, {check_every_n_steps}. For {monitor} use check_on='epoch' (checks after each validation)")
    if check_on == "epoch" and monitor == "train/loss":
        fail("train/loss is one optimizer step's loss; per epoch monitor train/loss_epoch, or set check_on='steps'")
