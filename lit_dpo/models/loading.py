"""Building the policy (and, for full fine-tuning, a frozen reference) from a resolved model: LoRA, 4-bit, 8-bit.

Where the weights come from is `lit_dpo.models.sources`; this module turns them into what DPOModule trains.
With `lit_dpo.models.adapters` it is the only place that imports peft and bitsandbytes.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from lit_dpo.models.sources import ModelLoadError, resolve_model_path

Quantization = Literal["nf4", "fp4", "int8"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`model.dtype` names and the torch dtypes they stand for."""


def _quantization_config(quantization: Quantization, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs; returns how many layers were set.

    On such CPUs the first no-grad forward (validation, generation, the reference pass) repacks every
    `Linear4bit` weight into a layout whose backward path no longer reaches the LoRA adapters: their
    gradients silently become None. Turning the repack off keeps training correct at a small speed cost.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_policy(
    name_or_path: str,
    *,
    finetuning: Literal["lora", "full"],
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target_modules: str | list[str],
    quantization: Quantization | None,
    dtype: torch.dtype,
    gradient_checkpointing: bool,
    trust_remote_code: bool,
    attn_implementation: str | None,
    device: torch.device | None = None,
    init_adapter: str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Build the trainable policy and, for full fine-tuning, a frozen reference copy.

    The settings and their defaults are documented once, on `DPOModule.__init__` (the config schema).

    Returns:
        (policy, reference). Under LoRA the reference is None: it is the policy with its adapters
        disabled (see `reference_mode`), so no second copy of the weights is held.
    """
    from transformers import AutoModelForCausalLM

    if init_adapter is not None and finetuning != "lora":
        raise ModelLoadError(
            "model.init_adapter needs model.finetuning: lora (the SFT adapter becomes the trainable adapter "
            "and the reference); remove init_adapter or use finetuning: lora"
        )
    if quantization is not None and finetuning == "full":
        raise ModelLoadError(
            "model.finetuning=full cannot train a quantized model; use model.finetuning: lora with "
            f"model.quantization: {quantization}, or set model.quantization: null"
        )
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
        kwargs["device_map"] = {"": device or torch.device("cpu")}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    model.train()  # from_pretrained returns eval mode; train like the HF Trainer does (dropout on)

    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        if quantization in ("nf4", "fp4"):
            disable_cpu_weight_repacking(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if finetuning == "full":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model, reference

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules,
        task_type="CAUSAL_LM",
    )
    policy = get_peft_model(model, lora)
    if init_adapter is not None:
        from lit_dpo.models.adapters import attach_init_adapter

        attach_init_adapter(policy, init_adapter, lora_r=lora_r, lora_alpha=lora_alpha)
    return policy, None


def reference_mode(policy: torch.nn.Module):
    """Context in which `policy` computes the reference model: the frozen SFT adapter when the run
    started from one (`init_adapter`), else the base model (adapters off)."""
    from lit_dpo.models.adapters import has_reference_adapter, reference_adapter_active

    return reference_adapter_active(policy) if has_reference_adapter(policy) else policy.disable_adapter()


def is_lora(policy: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(policy, PeftModel)
