"""DPOModule invariants on a tiny random Llama: exact log-probs, ln 2 at init, 4-bit LoRA gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dpo import forward
from lit_dpo.data.collate import PreferenceCollator
from lit_dpo.errors import ConfigError
from lit_dpo.module import DPOModule, linear_warmup_then_decay
from tests.full_logits import sequence_logps

PAIRS = [
    ("Recommend one movie: Star City (1999), Dark River (2001)", "Star City (1999)", "Dark River (2001)"),
    ("The user watched drama and war movies. Choose one:", "The Last King (1977)", "Love Game (2010)"),
    ("Which title next?", "Night Road", "Queen of the House (1988)"),
    ("history: comedy, comedy, action. candidates: A, B", "A", "B"),
]


def make_batch(tokenizer, pairs=PAIRS) -> dict:
    rows = []
    for prompt, chosen, rejected in pairs:
        completion = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            {
                "prompt_input_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
                "chosen_input_ids": completion(chosen),
                "rejected_input_ids": completion(rejected),
            }
        )
    return PreferenceCollator(tokenizer.pad_token_id)(rows)


def make_module(model_dir, **kwargs) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(model_name_or_path=model_dir, lora_dropout=0.0, **kwargs)
    module.configure_model()
    return module


def test_completion_logps_match_full_logits(tiny_model_dir, tiny_tokenizer):
    """Running the LM head on completion positions only gives the same numbers as full logits."""
    module = make_module(tiny_model_dir)
    batch = make_batch(tiny_tokenizer)
    with torch.no_grad():
        fast, counts = forward.row_logps(module.policy, batch)
        logits = module.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        slow, slow_counts = sequence_logps(logits, batch["labels"])
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == slow_counts.tolist()


def test_fresh_lora_gives_ln2_and_zero_accuracy(tiny_model_dir, tiny_tokenizer):
    module = make_module(tiny_model_dir)
    per_pair, metrics = module.pair_losses(make_batch(tiny_tokenizer))
    torch.testing.assert_close(per_pair, torch.full_like(per_pair, math.log(2)), atol=1e-6, rtol=0)
    assert metrics["rewards/accuracies"].sum() == 0
    assert metrics["rewards/margins"].abs().max() < 1e-6


def test_full_finetuning_reference_is_a_frozen_copy(tiny_model_dir, tiny_tokenizer):
    module = make_module(tiny_model_dir, finetuning="full")
    assert module.reference is not None and not any(p.requires_grad for p in module.reference.parameters())
    per_pair, _ = module.pair_losses(make_batch(tiny_tokenizer))
    torch.testing.assert_close(per_pair, torch.full_like(per_pair, math.log(2)), atol=1e-6, rtol=0)


def _lora_grads(module, batch) -> dict[str, torch.Tensor | None]:
    module.train()
    module.policy.zero_grad(set_to_none=True)
    per_pair, _ = module.pair_losses(batch)
    per_pair.mean().backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.policy.named_parameters() if p.requires_grad}


def test_4bit_lora_gradients_survive_a_validation_pass(tiny_model_dir, tiny_tokenizer):
    """bitsandbytes repacks 4-bit weights on the first no-grad eval forward on AVX512-BF16 CPUs, after
    which LoRA gradients are wrong or None; lit_dpo turns that repack off (see models.py)."""
    pytest.importorskip("bitsandbytes")
    module = make_module(tiny_model_dir, quantization="nf4")
    for name, p in module.policy.named_parameters():  # B = 0 would make most grads trivially zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = make_batch(tiny_tokenizer)
    before = _lora_grads(module, batch)
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    after = _lora_grads(module, batch)
    assert all(g is not None for g in after.values()), [n for n, g in after.items() if g is None]
    assert all(g.abs().sum() > 0 for g in after.values())
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"loss_type": "nope"}, "model.loss_type"),
        ({"beta": 0.0}, "model.beta"),
        ({"beta": -0.1}, "model.beta"),
        ({"learning_rate": 0.0}, "model.learning_rate"),
        ({"label_smoothing": 0.5}, "model.label_smoothing"),
        ({"warmup_steps": -1}, "model.warmup_steps"),
        ({"model_name_or_path": "/does/not/exist"}, "model.model_name_or_path"),
    ],
)
def test_bad_settings_fail_with_the_key_named(kwargs, key):
    with pytest.raises(ConfigError if key != "model.model_name_or_path" else ValueError, match=key):
        DPOModule(**kwargs)


def test_warmup_then_linear_decay_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=30)
    for step in range(32):
        assert linear_warmup_then_decay(step, 5, 30) == pytest.approx(hf.lr_lambdas[0](step))


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_quantized_policies_train_from_ln2(tiny_model_dir, tiny_tokenizer, quantization):
    pytest.importorskip("bitsandbytes")
    module = make_module(tiny_model_dir, quantization=quantization)
    per_pair, _ = module.pair_losses(make_batch(tiny_tokenizer))
    torch.testing.assert_close(per_pair, torch.full_like(per_pair, math.log(2)), atol=1e-5, rtol=0)
    per_pair.mean().backward()
    assert all(p.grad is not None for p in module.policy.parameters() if p.requires_grad)
