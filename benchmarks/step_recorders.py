"""What each contender records while it trains: wall-clock marks and per-step losses.

Both recorders keep the same fields, so the benchmark compares like with like:
    start: when the timed part begins (after model loading and tokenization). lit_dpo: `on_fit_start`,
        which comes before any reference precompute done at fit start. TRL: `on_train_begin`, plus the
        separately timed reference precompute (TRL runs it inside `DPOTrainer.__init__`).
    train_start: when the first training batch is about to run.
    epoch_ends: one mark per finished epoch, so a 3-epoch run also yields the 1-epoch figure.
    losses: the training loss of every optimizer step, in order.
    step_ends: when each optimizer step's logging was done (where the time goes, step by step).
Times are `time.perf_counter()` seconds; only differences between marks are meaningful.

The Lightning recorder also gives both sides the same LoRA initialisation (`reinit_lora`): LoRA's `A`
matrices are random, and how much of the global torch RNG the two stacks consume before creating them
differs, so without this the curves after step 1 would differ for reasons that have nothing to do
with the trainer.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from transformers import TrainerCallback

LORA_INIT_SEED = 1234


def reinit_lora(model: torch.nn.Module, seed: int = LORA_INIT_SEED) -> int:
    """Re-draw every LoRA `A` (PEFT's default Kaiming-uniform) from a private generator and zero every `B`.

    Args:
        model: A PEFT model; its parameter names are the same whichever trainer built it.
        seed: Seed of the generator; parameters are visited in sorted-name order.

    Returns:
        The number of LoRA matrices re-initialised.
    """
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(param, a=math.sqrt(5), generator=generator)
            elif ".lora_B." in name:
                param.zero_()
            else:
                continue
            count += 1
    if count == 0:
        raise RuntimeError("reinit_lora: the model has no LoRA parameters; the benchmark expects LoRA on both sides")
    return count


def empty_record() -> dict:
    return {"start": None, "train_start": None, "epoch_ends": [], "losses": [], "step_ends": []}


class LightningStepRecorder(L.Callback):
    """Marks and per-step `train/loss` of a lit_dpo run; also aligns the LoRA init (see module docstring).

    The clock starts in `setup`, which Lightning calls for callbacks before `DPOModule.setup`: the
    reference precompute (`model.precompute_reference`) runs there, so it is timed, and so is the model
    load that it triggers (a second or two that TRL's side does not pay; the comparison errs against us).

    Args:
        lora_seed: Seed for `reinit_lora`.
    """

    def __init__(self, lora_seed: int = LORA_INIT_SEED) -> None:
        self.lora_seed = lora_seed
        self.record = empty_record()
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.record["start"] = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the reference (adapters off) does not depend on the LoRA weights, so re-drawing them after a
        # precomputed reference changes nothing it computed
        reinit_lora(pl_module.policy, self.lora_seed)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["train_start"] = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # DPOModule logs `train/loss` once per optimizer step (in on_before_optimizer_step).
        if trainer.global_step != self._last_step and "train/loss" in trainer.callback_metrics:
            self._last_step = trainer.global_step
            self.record["losses"].append(float(trainer.callback_metrics["train/loss"]))
            self.record["step_ends"].append(time.perf_counter())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["epoch_ends"].append(time.perf_counter())


class TrlStepRecorder(TrainerCallback):
    """Marks and per-step losses of a TRL run (losses from the trainer's log history, logging_steps=1)."""

    def __init__(self) -> None:
        self.record = empty_record()

    def on_train_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.record["start"] = self.record["train_start"] = now

    def on_epoch_end(self, args, state, control, **kwargs):
        self.record["epoch_ends"].append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.record["losses"].append(float(logs["loss"]))
            self.record["step_ends"].append(time.perf_counter())
