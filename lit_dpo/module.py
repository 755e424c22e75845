"""DPOModule: the policy, its reference and a preference loss as one LightningModule.

Each step scores the chosen and the K rejected answers in one forward (`lit_dpo.forward`, either batch
layout), once for the reference (adapters off, no grad; or precomputed, `lit_dpo.reference_cache`) and
once for the policy, then applies the loss chosen by `loss_type` from `lit_dpo.losses`. Metrics are
torchmetrics means weighted by pairs, so a logged step value covers the whole gradient-accumulation
window and every process, as if the effective batch had been one forward.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchmetrics import MeanMetric, SumMetric
from typing_extensions import override

from lit_dpo import forward, losses, resume_state
from lit_dpo.data.collate import REFERENCE_KEY
from lit_dpo.errors import ConfigError
from lit_dpo.models.adapters import read_adapter
from lit_dpo.models.loading import DTYPES, Quantization, load_policy, reference_mode
from lit_dpo.models.sources import check_model_path

# Names as in TRL (see shared/reference/losses.md), so curves compare directly.
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# Lightning suggests sync_dist=True for epoch-level logs under DDP; these values come from torchmetrics
# metrics, which already reduce over every process in compute(), so a second reduction would add nothing.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(train|val|test|rewards)/")


def linear_warmup_then_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: 0 → 1 over `warmup_steps`, then linearly down to 0 at `total_steps`.

    Identical to transformers' `get_linear_schedule_with_warmup` (what TRL uses), so curves compare.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_warmup_then_constant(step: int, warmup_steps: int) -> float:
    """LR multiplier: 0 → 1 over `warmup_steps`, then 1 (transformers' `get_constant_schedule_with_warmup`)."""
    return min(1.0, step / max(1, warmup_steps)) if warmup_steps else 1.0


def _mean_metrics() -> torch.nn.ModuleDict:
    # nan_strategy="disable": a NaN loss must reach the logs (and the divergence guard), not be dropped.
    # ModuleDict keys may not contain "/", hence the "__".
    return torch.nn.ModuleDict({name.replace("/", "__"): MeanMetric(nan_strategy="disable") for name in METRIC_NAMES})


class DPOModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "embedded:smollm2-135m-instruct",
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        learning_rate: float = 5e-5,
        warmup_steps: int = 5,
        lr_scheduler_type: Literal["linear", "constant_with_warmup"] = "linear",
        weight_decay: float = 0.0,
        finetuning: Literal["lora", "full"] = "lora",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: str | list[str] = "all-linear",
        quantization: Quantization | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        init_adapter: str | None = None,
        precompute_reference: bool = True,
    ) -> None:
        """Preference fine-tuning of a causal LM against a frozen reference.

        Args:
            model_name_or_path: HF directory, hub id, `.gguf` file, or `embedded:smollm2-135m-instruct`.
            loss_type: One of sigmoid (DPO), cdpo, robust, hinge, ipo, sft, simpo, sdpo (S-DPO; = sigmoid with one negative).
            beta: Strength of the KL anchor to the reference; the guide's range 0.05–0.5, 0.1 default.
            label_smoothing: Assumed label-noise rate ε for cdpo / robust, in [0, 0.5).
            simpo_gamma: Target reward margin γ of the simpo loss.
            learning_rate: Peak AdamW learning rate after warm-up (guide: 1e-5 … 1e-4, 5e-5 default).
            warmup_steps: Optimizer steps of linear warm-up from 0, then linear decay to 0 at the end.
            lr_scheduler_type: After warm-up, `linear` decays to 0 at the last step (TRL's default);
                `constant_with_warmup` holds the peak LR, so an N-epoch run's first epochs equal any
                shorter run's (what lets a sweep reuse per-epoch checkpoints exactly).
            weight_decay: AdamW decoupled weight decay.
            finetuning: `lora` trains adapters (reference = adapters off); `full` trains every weight
                against a frozen copy.
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = alpha / r).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Modules that get adapters; `all-linear` = every linear layer but the LM head.
            quantization: Load the base weights in 4-bit (`nf4`, `fp4`) or 8-bit (`int8`) with bitsandbytes.
            dtype: Dtype of the non-quantized weights and of 4-bit compute.
            gradient_checkpointing: Recompute activations in backward to save memory (slower).
            attn_implementation: transformers attention backend (`sdpa`, `eager`, …).
            trust_remote_code: Allow model code from the checkpoint's repository to run.
            init_adapter: Start from an SFT adapter and use it as the reference (S-DPO's recipe): the
                last.ckpt of a LoRA SFT run or a PEFT adapter directory; None starts from the base model.
            precompute_reference: Compute the reference log-probs of every pair once, when the loaders are
                built (fit: train and val), and cache them next to the tokenized data, reused by every epoch,
                resume, later run and validate/test on the same data and model, instead of a reference
                forward per step. Exact (the reference never changes); see `lit_dpo.reference_cache`. The
                CLI connects it to the data module; in your own script call
                `datamodule.connect(reference_logps=lit_dpo.reference_cache.ReferenceLogps(module))`.
        """
        super().__init__()
        _validate(loss_type, beta, label_smoothing, learning_rate, warmup_steps, lora_r)
        check_model_path(model_name_or_path)  # fail before any run directory exists
        if init_adapter is not None:
            read_adapter(init_adapter)  # same: a wrong path fails now, not after the model loads
        self.save_hyperparameters()
        self.loss_config = losses.LossConfig(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        # Only trainable weights are checkpointed; the frozen base is reloaded from model_name_or_path.
        self.strict_loading = False
        self.train_metrics = _mean_metrics()  # one optimizer step (all accumulated micro-batches)
        self.epoch_metrics = _mean_metrics()  # the whole training epoch
        self.epoch_metrics.apply(lambda m: m.persistent(True) if isinstance(m, MeanMetric) else None)  # checkpointed
        self.val_metrics = _mean_metrics()
        self.tokens_seen = SumMetric()
        self._window_start = time.perf_counter()
        self._rng_to_restore: dict | None = None
        self._epochs_started = 0  # epochs whose training began, this run and the resumed ones
        self.checkpoint_epochs: int | None = None  # set when weights come from a checkpoint

    @override
    def configure_model(self) -> None:
        if self.policy is not None:  # Lightning may call this more than once
            return
        hp = self.hparams
        try:  # the target device matters for 4-bit weights, which bitsandbytes quantizes as they move there
            device = self.trainer.strategy.root_device
        except RuntimeError:  # not attached to a Trainer (export, recommend, tests)
            device = None
        self.policy, self.reference = load_policy(
            hp.model_name_or_path,
            finetuning=hp.finetuning,
            lora_r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            lora_target_modules=hp.lora_target_modules,
            quantization=hp.quantization,
            dtype=DTYPES[hp.dtype],
            gradient_checkpointing=hp.gradient_checkpointing,
            trust_remote_code=hp.trust_remote_code,
            attn_implementation=hp.attn_implementation,
            device=device,
            init_adapter=hp.init_adapter,
        )

    @override
    def setup(self, stage: str) -> None:
        # The data module has read its files by now (the CLI sets it up first): fail before any step
        # when the data has K > 1 rejected answers that the chosen loss cannot use.
        for where, count in getattr(self.trainer.datamodule, "negatives", {}).items():
            _check_negatives(self.hparams.loss_type, count, where)

    # ----------------------------------------------------------------------------------- forward
    def answer_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs and token counts of every answer, both [B, A]: column 0 the chosen answer,
        columns 1..A-1 the rejected ones (A = 1 + K negatives); `lit_dpo.forward.answer_logps`."""
        return forward.answer_logps(model, batch)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs [B, A]: precomputed ones when the batch carries them, else a no-grad
        forward of the reference (adapters off under LoRA, the frozen copy under full fine-tuning)."""
        if REFERENCE_KEY in batch:
            return batch[REFERENCE_KEY]
        with torch.no_grad():
            if self.reference is not None:
                return self.answer_logps(self.reference, batch)[0]
            with reference_mode(self.policy):
                return self.answer_logps(self.policy, batch)[0]

    def preference_logps(self, batch: dict[str, torch.Tensor]) -> losses.PreferenceLogps:
        ref_logps = self.reference_logps(batch)
        policy_logps, tokens = self.answer_logps(self.policy, batch)
        one = policy_logps.shape[1] == 2  # one negative: rejected values are [B], as every loss expects

        def rejected(values: torch.Tensor) -> torch.Tensor:
            return values[:, 1] if one else values[:, 1:]

        return losses.PreferenceLogps(
            policy_chosen=policy_logps[:, 0],
            policy_rejected=rejected(policy_logps),
            reference_chosen=ref_logps[:, 0],
            reference_rejected=rejected(ref_logps),
            chosen_tokens=tokens[:, 0],
            rejected_tokens=rejected(tokens),
        )

    def pair_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses [B] and per-pair metrics (rewards, accuracies, log-probs)."""
        logps = self.preference_logps(batch)
        if logps.policy_rejected.dim() == 2:
            _check_negatives(self.hparams.loss_type, logps.policy_rejected.shape[1], "this batch")
        per_pair = losses.preference_loss(self.hparams.loss_type, logps, self.loss_config)
        return per_pair, losses.reward_metrics(logps, self.hparams.beta)

    # ---------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        per_pair, metrics = self.pair_losses(batch)
        values = {"loss": per_pair.detach(), **metrics}
        for collection in (self.train_metrics, self.epoch_metrics):
            _update(collection, values)
        self.tokens_seen.update(batch["attention_mask"].sum())
        return per_pair.mean()

    @override
    def on_train_start(self) -> None:
        self._window_start = time.perf_counter()

    @override
    def on_train_epoch_start(self) -> None:
        self._epochs_started = self.current_epoch + 1

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # restored here, after data loading set-up used no RNG
            resume_state.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Every micro-batch of this accumulation window has run: log the window as one step. Logged here,
        # before any callback's on_train_batch_end, so callbacks see this step's values.
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        logged = _compute_and_reset(self.train_metrics, prefix_loss="train/")
        logged["train/lr"] = optimizer.param_groups[0]["lr"]
        logged["train/tokens_per_sec"] = self.tokens_seen.compute().item() / elapsed
        self.tokens_seen.reset()
        self._window_start = time.perf_counter()
        self.log("train/loss", logged.pop("train/loss"), prog_bar=True)
        self.log("rewards/accuracies", logged.pop("rewards/accuracies"), prog_bar=True)
        self.log_dict(logged)

    @override
    def on_train_epoch_end(self) -> None:
        epoch = _compute_and_reset(self.epoch_metrics, prefix_loss="train/")
        self.log("train/loss_epoch", epoch["train/loss"])
        self.log("rewards/accuracies_epoch", epoch["rewards/accuracies"])

    # -------------------------------------------------------------------------------- evaluation
    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        per_pair, metrics = self.pair_losses(batch)
        _update(self.val_metrics, {"loss": per_pair, **metrics})

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        values = _compute_and_reset(self.val_metrics, prefix_loss=f"{stage}/")
        self.log_dict({(k if k.startswith(stage) else f"{stage}/{k}"): v for k, v in values.items()}, prog_bar=False)

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[dict[str, float]]:
        """Per-pair scores: loss, implicit rewards and log-probs, one dict per pair."""
        per_pair, metrics = self.pair_losses(batch)
        columns = {"loss": per_pair, **metrics}
        return [{k: v[i].item() for k, v in columns.items()} for i in range(per_pair.shape[0])]

    # ------------------------------------------------------------------------ optimizer + state
    @override
    def configure_optimizers(self) -> dict:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        if self.hparams.get("lr_scheduler_type", "linear") == "constant_with_warmup":
            schedule = partial(linear_warmup_then_constant, warmup_steps=self.hparams.warmup_steps)
        else:
            schedule = partial(linear_warmup_then_decay, warmup_steps=self.hparams.warmup_steps, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # the running epoch means, so an epoch interrupted and resumed still reports its whole mean
        local = {"epoch_metrics": self.epoch_metrics.state_dict(), "rng_state": resume_state.get_rng_state()}
        checkpoint.update(local)  # process 0's, the whole state of a single-process run
        checkpoint[EPOCHS_STARTED] = self._epochs_started
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # Both are per process (own dropout draws, own share of the epoch): keep every process's.
            # Every process runs this hook (Trainer.save_checkpoint), so the collective is safe.
            checkpoint["per_process_state"] = resume_state.gather_per_process(move_data_to_device(local, "cpu"))

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = resume_state.own_state(checkpoint, self.global_rank, self.trainer.world_size)
        self._rng_to_restore = own.get("rng_state")
        if "epoch_metrics" in own:
            self.epoch_metrics.load_state_dict(own["epoch_metrics"])
        # Epochs the loaded weights were trained for (test reports it; the config may say more or fewer),
        # counting a partial epoch. Checkpoints from before this key: Lightning's `epoch` is the 0-based
        # epoch the checkpoint was written in (an end-of-fit one too: it is written before the last
        # epoch counts as completed).
        started = checkpoint.get(EPOCHS_STARTED)
        if started is None and isinstance(checkpoint.get("epoch"), int):
            started = checkpoint["epoch"] + 1
        self._epochs_started = self.checkpoint_epochs = started
        resume_state.rescale_learning_rate(checkpoint, self.hparams.learning_rate)


# --------------------------------------------------------------------------------------- helpers
EPOCHS_STARTED = "lit_dpo_epochs_started"  # checkpoint key: epochs whose training began, a partial one included


def _validate(loss_type: str, beta: float, label_smoothing: float, learning_rate: float, warmup_steps: int, lora_r: int) -> None:
    if loss_type not in losses.LOSS_TYPES:
        raise ConfigError(f"model.loss_type: unknown loss '{loss_type}'; choose one of: {', '.join(losses.LOSS_TYPES)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"model.beta must be > 0 (got {beta}); the guide's range is 0.05–0.5, 0.1 to start")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"model.label_smoothing must be in [0, 0.5) (got {label_smoothing})")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ConfigError(f"model.learning_rate must be > 0 (got {learning_rate}); the guide's default is 5e-5")
    if warmup_steps < 0:
        raise ConfigError(f"model.warmup_steps must be >= 0 (got {warmup_steps})")
    if lora_r < 1:
        raise ConfigError(f"model.lora_r must be >= 1 (got {lora_r})")


def _check_negatives(loss_type: str, count: int, where: str) -> None:
    """Only S-DPO compares a chosen answer with several rejected ones; every other loss takes exactly one."""
    if count > 1 and loss_type != "sdpo":
        raise ConfigError(
            f"model.loss_type: '{loss_type}' takes one rejected answer per prompt but {where} has {count}; "
            "use model.loss_type: sdpo, or prepare the data with --num-negatives 1"
        )


def _update(collection: torch.nn.ModuleDict, values: dict[str, torch.Tensor]) -> None:
    for name in METRIC_NAMES:
        collection[name.replace("/", "__")].update(values[name].float())


def _compute_and_reset(collection: torch.nn.ModuleDict, prefix_loss: str) -> dict[str, float]:
    out = {}
    for name in METRIC_NAMES:
        metric = collection[name.replace("/", "__")]
        out[prefix_loss + name if name == "loss" else name] = metric.compute().item()
        metric.reset()
    return out
