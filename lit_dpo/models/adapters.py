"""Starting DPO from an SFT adapter, and using that adapter as the reference (`model.init_adapter`).

S-DPO (Chen et al. 2024) and LLaRA first fine-tune the model on the target answers (SFT) and then run
preference optimisation from there, with the SFT model as the reference: the KL anchor then pulls
towards a model that already knows the task format, not towards the untuned base. Under LoRA both
live on one base model as two adapters:

- `default`, the trainable adapter, starts as a copy of the SFT adapter;
- `reference`, a frozen second copy, is what the reference pass switches to (instead of turning
  the adapters off, as plain DPO from the base does).

The SFT adapter comes from a lit_dpo checkpoint of an SFT run (`tb_logs/sft/version_0/checkpoints/
last.ckpt`) or a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from lit_dpo.errors import UserInputError
from lit_dpo.files import read_checkpoint

REFERENCE_ADAPTER = "reference"
_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.default(\.|$)")


class AdapterError(UserInputError):
    """An `init_adapter` that cannot be used with this model; the message says how to fix it."""


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA weights of an SFT adapter (keys without adapter name, as PEFT saves them) and its settings.

    Args:
        path: A lit_dpo `.ckpt` (LoRA run) or a PEFT adapter directory.

    Returns:
        ``(state, settings)``: `settings` holds `r`, `lora_alpha` and `target_modules` when known.
    """
    source = Path(path).expanduser()
    if source.is_dir():
        return _read_peft_dir(source)
    checkpoint = read_checkpoint(
        path,
        option="model.init_adapter",
        required=("state_dict",),
        hint="give the last.ckpt/best.ckpt of an SFT run, e.g. tb_logs/sft/version_0/checkpoints/last.ckpt, "
        "or a PEFT adapter directory",
        error=AdapterError,
    )
    hparams = checkpoint.get("hyper_parameters", {})
    if hparams.get("finetuning", "lora") != "lora":
        raise AdapterError(f"model.init_adapter: {path} is a full fine-tuning checkpoint; an adapter needs a finetuning: lora run")
    state = {
        _ADAPTER_NAME.sub(lambda m: f".{m.group(1)}{m.group(2)}", key.removeprefix("policy.")): value
        for key, value in checkpoint["state_dict"].items()
        if ".lora_" in key
    }
    if not state:
        raise AdapterError(f"model.init_adapter: {path} holds no LoRA weights; give the checkpoint of a LoRA (SFT) run")
    settings = {k: hparams[h] for k, h in (("r", "lora_r"), ("lora_alpha", "lora_alpha")) if h in hparams}
    if "lora_target_modules" in hparams:
        settings["target_modules"] = hparams["lora_target_modules"]
    return state, settings


def _read_peft_dir(source: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config_file = source / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"model.init_adapter: {source} has no adapter_config.json; give a PEFT adapter directory or a .ckpt")
    from peft.utils import load_peft_weights

    settings = json.loads(config_file.read_text())
    state = load_peft_weights(str(source), device="cpu")
    return state, {k: settings[k] for k in ("r", "lora_alpha", "target_modules") if k in settings}


def attach_init_adapter(policy: torch.nn.Module, path: str, *, lora_r: int, lora_alpha: int) -> None:
    """Copy the SFT adapter at `path` into the trainable `default` adapter and a frozen `reference` one.

    Args:
        policy: A PEFT model with its freshly initialised `default` adapter.
        path: See :func:`read_adapter`.
        lora_r, lora_alpha: This run's LoRA settings, which must equal the adapter's.
    """
    from peft.utils import set_peft_model_state_dict

    state, settings = read_adapter(path)
    for key, ours in (("r", lora_r), ("lora_alpha", lora_alpha)):
        if key in settings and settings[key] != ours:
            name = "lora_r" if key == "r" else key
            raise AdapterError(
                f"model.init_adapter: {path} was trained with {name}={settings[key]} but model.{name}={ours}; "
                f"set model.{name}: {settings[key]} (the DPO adapter starts as a copy of the SFT one)"
            )
    policy.add_adapter(REFERENCE_ADAPTER, policy.peft_config["default"])
    for adapter in ("default", REFERENCE_ADAPTER):
        result = set_peft_model_state_dict(policy, state, adapter_name=adapter)
        missing = [k for k in result.missing_keys if f".{adapter}." in k and ".lora_" in k]
        if missing or result.unexpected_keys:
            first = (missing or result.unexpected_keys)[0]
            raise AdapterError(
                f"model.init_adapter: {path} does not fit this model's adapters (first mismatch: {first}); "
                "model.model_name_or_path and model.lora_target_modules must match the SFT run"
            )
    policy.set_adapter("default")  # active and trainable again; every other adapter (the reference) frozen


def has_reference_adapter(policy: torch.nn.Module) -> bool:
    return REFERENCE_ADAPTER in getattr(policy, "peft_config", {})


@contextlib.contextmanager
def reference_adapter_active(policy: torch.nn.Module) -> Iterator[None]:
    """Run the frozen `reference` adapter instead of `default`, leaving `requires_grad` as it was after.

    PEFT's `set_adapter` also sets which adapter trains: with `inference_mode=True` every adapter is
    frozen while the reference runs (under no_grad, so nothing is lost), and switching back makes
    `default` trainable again, as PEFT's own `disable_adapter()` does for the base-model reference.
    """
    policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        policy.set_adapter("default")
