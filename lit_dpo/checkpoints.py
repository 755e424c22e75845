"""A trained `DPOModule` outside Lightning: rebuilt from its `.ckpt` (`recommend`) and exported as a plain
Hugging Face model (`export`).

Checkpoints hold only the trainable weights (the LoRA adapters, see `DPOModule.on_save_checkpoint`)
plus the module's init arguments, so the module is rebuilt from those arguments (the base model is
reloaded from `model_name_or_path`) and the trained weights are loaded on top, with every trainable
weight accounted for: a checkpoint that does not fit its own settings is an error, never a silently
half-loaded model.

Exporting folds the adapters into the base weights (`merge_and_unload`, W' = W + (alpha / r) · B A) and
saves an ordinary safetensors directory with its tokenizer, which `AutoModelForCausalLM.from_pretrained`,
vLLM or llama.cpp's converter read directly: evaluation and serving need neither peft nor this package.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from lit_dpo.errors import UserInputError
from lit_dpo.files import atomic_path, read_checkpoint
from lit_dpo.models.loading import DTYPES, is_lora
from lit_dpo.models.sources import load_tokenizer
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
    return read_checkpoint(
        ckpt_path,
        option=f"{command} --ckpt_path",
        required=("hyper_parameters", "state_dict"),
        hint="give a .ckpt from a fit run, e.g. tb_logs/<name>/version_0/checkpoints/last.ckpt",
        error=CheckpointError,
    )


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


class ExportError(CheckpointError):
    """A checkpoint or output directory that cannot be exported; the message says how to fix it."""


def export_checkpoint(
    ckpt_path: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Merge a checkpoint's trained weights into its base model and save it as a HF directory.

    Args:
        ckpt_path: A `.ckpt` written by `python -m lit_dpo fit` (LoRA or `finetuning: full`).
        out: Directory to write `config.json`, `model.safetensors` and the tokenizer files into.
        dtype: Weight dtype of the saved model (float32, bfloat16, float16); None keeps the
            training dtype. The merge itself always runs in the training dtype.
        overwrite: Replace `out` when it exists and is not empty.

    Returns:
        The output directory.

    Raises:
        ExportError: Missing or foreign checkpoint, adapter keys that do not match the model the
            checkpoint's settings build, an unknown dtype, or a non-empty `out` without `overwrite`.
    """
    ckpt_path, out = Path(ckpt_path).expanduser(), Path(out).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"export --dtype: unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"export --out: {out} exists and is not empty; choose another directory or pass --overwrite")
    # Merging adds B A to W; a 4-/8-bit W cannot hold the sum, so the base is loaded unquantized.
    module = load_trained_module(ckpt_path, command="export", quantized=False)
    # only the trained adapter; a frozen `reference` adapter (init_adapter runs) is dropped, not merged
    model = module.policy.merge_and_unload(adapter_names=["default"]) if is_lora(module.policy) else module.policy
    model.eval()
    model.config.use_cache = True  # training turned the KV cache off; generation wants it back
    if dtype is not None:
        model.to(DTYPES[dtype])
        model.config.dtype = DTYPES[dtype]
    tokenizer = load_tokenizer(module.hparams.model_name_or_path, trust_remote_code=module.hparams.trust_remote_code)
    # A failed export never leaves a half-written model, and overwriting never keeps stale shards from a
    # previous export next to the new ones.
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
