"""Rebuilding a trained `DPOModule` from a `.ckpt` outside Lightning (`export`, `recommend`).

Checkpoints hold only the trainable weights (the LoRA adapters, see `DPOModule.on_save_checkpoint`)
plus the module's init arguments, so the module is rebuilt from those arguments (the base model is
reloaded from `model_name_or_path`) and the trained weights are loaded on top, with every trainable
weight accounted for: a checkpoint that does not fit its own settings is an error, never a silently
half-loaded model.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from lit_dpo.errors import UserInputError
from lit_dpo.module import DPOModule

log = logging.getLogger(__name__)


class CheckpointError(UserInputError):
    """A checkpoint that cannot be loaded; the message names the command's option and the fix."""


def load_trained_module(ckpt_path: str | Path, *, command: str, quantized: bool = True) -> DPOModule:
    """The module a fit run trained, with its weights loaded, in eval mode.

    Args:
        ckpt_path: A `.ckpt` written by `python -m lit_dpo fit` (LoRA or `finetuning: full`).
        command: The subcommand asking (`export`, `recommend`), named in error messages.
        quantized: Load the base quantized as in training; False loads it unquantized (merging needs that).

    Raises:
        CheckpointError: Missing or foreign checkpoint, or weights that do not match the model its
            settings build.
    """
    ckpt_path = Path(ckpt_path).expanduser()
    checkpoint = _read(ckpt_path, command)
    module = _module_from_hparams(checkpoint["hyper_parameters"], ckpt_path, quantized)
    module.configure_model()
    _load_trained_weights(module, checkpoint["state_dict"], ckpt_path, command)
    return module.eval()


def _read(ckpt_path: Path, command: str) -> dict:
    if not ckpt_path.is_file():
        raise CheckpointError(
            f"{command} --ckpt_path: not found: {ckpt_path} (give a .ckpt from a fit run, e.g. "
            "tb_logs/<name>/version_0/checkpoints/last.ckpt)"
        )
    try:
        # weights_only: the checkpoint holds tensors and plain values only, and unpickling code is not needed
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a readable checkpoint"
        raise CheckpointError(f"{command} --ckpt_path: {ckpt_path} is not a readable checkpoint ({type(error).__name__})") from error
    if not isinstance(checkpoint, dict) or not {"hyper_parameters", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(
            f"{command} --ckpt_path: {ckpt_path} has no hyper_parameters/state_dict; give a checkpoint written by "
            "python -m lit_dpo fit"
        )
    return checkpoint


def _module_from_hparams(hparams: dict, ckpt_path: Path, quantized: bool) -> DPOModule:
    # LightningCLI may add its own keys (e.g. `_instantiator`); keep only DPOModule's arguments.
    accepted = inspect.signature(DPOModule.__init__).parameters
    kwargs = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
    if kwargs.get("quantization") is not None and not quantized:
        log.warning("%s was trained with quantization=%s; loading the unquantized base weights", ckpt_path, kwargs["quantization"])
        kwargs["quantization"] = None
    kwargs["gradient_checkpointing"] = False  # inference only; the saved config should not carry it
    return DPOModule(**kwargs)


def _load_trained_weights(module: DPOModule, state_dict: dict[str, torch.Tensor], ckpt_path: Path, command: str) -> None:
    """Load the checkpoint's weights; every trainable weight must be found, and nothing else may be left over."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    hint = (
        "the checkpoint's hyper_parameters (model_name_or_path, lora_r, lora_target_modules, finetuning) "
        "must match the run that wrote it"
    )
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches; torch lists every one, the first is enough to act on
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise CheckpointError(f"{command} --ckpt_path: {ckpt_path}: {detail}; {hint}") from error
    unknown = sorted(result.unexpected_keys)
    missing = sorted(trainable - state_dict.keys())
    if unknown or missing:
        first, count = (unknown[0], len(unknown)) if unknown else (missing[0], len(missing))
        what = "keys the model does not have" if unknown else "trainable weights missing from the checkpoint"
        raise CheckpointError(f"{command} --ckpt_path: {ckpt_path}: {count} {what} (first: {first}); {hint}")
