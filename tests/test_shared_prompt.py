"""The shared-prompt layout and K rejected answers: hand-checked layout, and exactness against the plain
layout (the issue's bar: 1e-5 in fp32) for log-probs and LoRA gradients, sdpa and eager, LoRA and 4-bit."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dpo.data.collate import PreferenceCollator
from lit_dpo.data.shared_prompt import SharedPromptCollator, pack_shared_prompt
from lit_dpo.errors import ConfigError
from lit_dpo.forward import attention_mask_4d, predictor_positions
from lit_dpo.module import DPOModule

PROMPTS = [
    "The user watched drama and war movies. Choose one:",
    "Which title next?",
    "history: comedy, comedy, action, horror, science fiction, romance. candidates: A, B, C",
]
ANSWERS = [
    ["The Last King (1977)", "Love Game (2010)", "A", "Dark River of the Night (2001)"],
    ["Night Road", "Queen of the House (1988)", "Star City", "B"],
    ["A", "The Dark Star (1999)", "C", "Love Story"],
]


def make_rows(tokenizer, batch_size: int, negatives: int) -> list[dict]:
    """Pairs with different prompt and answer lengths (so every layout pads), K negatives each."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = []
    for prompt, answers in list(zip(PROMPTS, ANSWERS))[:batch_size]:
        completions = [ids(a) + [tokenizer.eos_token_id] for a in answers[: 1 + negatives]]
        rejected = completions[1] if negatives == 1 else completions[1:]
        rows.append({"prompt_input_ids": ids(prompt), "chosen_input_ids": completions[0], "rejected_input_ids": rejected})
    return rows


def make_module(model_dir, **kwargs) -> DPOModule:
    torch.manual_seed(0)
    module = DPOModule(model_name_or_path=model_dir, lora_dropout=0.0, **kwargs)
    module.configure_model()
    for name, p in module.policy.named_parameters():  # B = 0 would make the policy equal the reference
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return module


# --------------------------------------------------------------------------------------- layout
def test_shared_collator_hand_checked_batch():
    rows = [
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [3, 9], "rejected_input_ids": [[4, 5, 9], [6, 9]], "t": "a"},
        {"prompt_input_ids": [7], "chosen_input_ids": [8, 9], "rejected_input_ids": [[5, 9], [4, 4, 9]], "t": "b"},
    ]
    batch = SharedPromptCollator(pad_token_id=0)(rows)
    x = -100
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 4, 5, 9, 6, 9], [7, 8, 9, 5, 9, 4, 4, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 9, [1] * 8 + [0]]
    assert batch["labels"].tolist() == [[x, x, 3, 9, 4, 5, 9, 6, 9], [x, 8, 9, 5, 9, 4, 4, 9, x]]
    # every answer continues the prompt's positions, as if it followed the prompt alone
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 1, 2, 3, 0]]
    assert batch["answer_index"].tolist() == [[-1, -1, 0, 0, 1, 1, 1, 2, 2], [-1, 0, 0, 1, 1, 2, 2, 2, -1]]
    assert batch["prompt_count"] == 2 and batch["t"] == ["a", "b"]

    mask = attention_mask_4d(batch["answer_index"], batch["attention_mask"], dtype=None)
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    # row 0, token 5 (second token of answer 1): the prompt (0, 1) and answer 1 up to itself (4, 5)
    assert mask[0, 0, 5].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # row 1, the padding token: an ordinary causal row, never all-masked (SDPA would give NaN)
    assert mask[1, 0, 8].all()
    additive = attention_mask_4d(batch["answer_index"], batch["attention_mask"], dtype=torch.float32)
    assert additive[0, 0, 5, 4] == 0 and additive[0, 0, 5, 2] == torch.finfo(torch.float32).min

    scored, source = predictor_positions(batch["labels"], batch["answer_index"], batch["position_ids"])
    assert scored.tolist() == (batch["labels"] != x).tolist()
    # the first token of every answer is predicted from the last prompt token (column 1 in row 0)
    assert source[:7].tolist() == [1, 2, 1, 4, 5, 1, 7]


def test_plain_collator_stacks_k_negatives_as_blocks():
    rows = [
        {"prompt_input_ids": [1], "chosen_input_ids": [3], "rejected_input_ids": [[4], [5, 6]]},
        {"prompt_input_ids": [2], "chosen_input_ids": [7], "rejected_input_ids": [[8], [9]]},
    ]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert batch["prompt_count"] == 2
    assert batch["input_ids"].tolist() == [[1, 3, 0], [2, 7, 0], [1, 4, 0], [2, 8, 0], [1, 5, 6], [2, 9, 0]]


def test_empty_prompt_scores_like_the_plain_layout():
    packed = pack_shared_prompt([[]], [[[3, 4], [5]]], pad_token_id=0)
    scored, source = predictor_positions(packed["labels"], packed["answer_index"], packed["position_ids"])
    assert scored.tolist() == [[False, True, False]] and source.tolist() == [0]  # first tokens unpredicted


# ------------------------------------------------------------------------------------ exactness
# Summed log-probs of the random tiny model are ~-100 nats, where one fp32 ulp is 7.6e-6: 1e-5 absolute
# plus 1e-6 relative allows for a different summation order, not for a different computation.
EXACT = {"atol": 1e-5, "rtol": 1e-6}


def _both_layouts(tokenizer, batch_size: int, negatives: int) -> tuple[dict, dict]:
    rows = make_rows(tokenizer, batch_size, negatives)
    pad = tokenizer.pad_token_id
    return PreferenceCollator(pad)(rows), SharedPromptCollator(pad)(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("batch_size", "negatives"), [(1, 1), (3, 1), (1, 3), (3, 3)])
def test_shared_layout_equals_plain_forward(tiny_model_dir, tiny_tokenizer, attn, batch_size, negatives):
    module = make_module(tiny_model_dir, attn_implementation=attn)
    plain, shared = _both_layouts(tiny_tokenizer, batch_size, negatives)
    with torch.no_grad():
        policy_plain, tokens_plain = module.answer_logps(module.policy, plain)
        policy_shared, tokens_shared = module.answer_logps(module.policy, shared)
        reference_plain, reference_shared = module.reference_logps(plain), module.reference_logps(shared)
    assert policy_shared.shape == (batch_size, 1 + negatives)
    torch.testing.assert_close(policy_shared, policy_plain, **EXACT)
    torch.testing.assert_close(reference_shared, reference_plain, **EXACT)
    assert tokens_shared.tolist() == tokens_plain.tolist()
    assert (policy_plain - reference_plain).abs().max() > 1e-3  # the adapters do change the numbers


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_layout_gives_the_same_lora_gradients(tiny_model_dir, tiny_tokenizer, attn):
    module = make_module(tiny_model_dir, attn_implementation=attn, loss_type="sdpo")
    grads = []
    for batch in _both_layouts(tiny_tokenizer, 3, 3):
        module.policy.zero_grad(set_to_none=True)
        per_pair, _ = module.pair_losses(batch)
        per_pair.mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad})
    plain, shared = grads
    assert plain.keys() == shared.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_k_answers_equal_each_answer_scored_alone(tiny_model_dir, tiny_tokenizer):
    module = make_module(tiny_model_dir)
    rows = make_rows(tiny_tokenizer, 3, 3)
    pad = tiny_tokenizer.pad_token_id
    alone = torch.zeros(3, 4)
    with torch.no_grad():
        for i, row in enumerate(rows):
            for j, answer in enumerate([row["chosen_input_ids"], *row["rejected_input_ids"]]):
                single = {"prompt_input_ids": row["prompt_input_ids"], "chosen_input_ids": answer, "rejected_input_ids": answer}
                alone[i, j] = module.answer_logps(module.policy, PreferenceCollator(pad)([single]))[0][0, 0]
        for collator in (PreferenceCollator(pad), SharedPromptCollator(pad)):
            torch.testing.assert_close(module.answer_logps(module.policy, collator(rows))[0], alone, **EXACT)


def test_nf4_shared_layout_equals_plain_forward(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    module = make_module(tiny_model_dir, quantization="nf4")
    plain, shared = _both_layouts(tiny_tokenizer, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            module.answer_logps(module.policy, shared)[0], module.answer_logps(module.policy, plain)[0], **EXACT
        )


def test_a_shared_batch_for_a_backend_without_custom_masks_is_refused(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """The layout is chosen before the loaders exist (tests/test_forward.py); a shared batch that still
    reaches such a model is an error, never converted batch by batch."""
    import lit_dpo.forward as forward_file

    module = make_module(tiny_model_dir)
    _, shared = _both_layouts(tiny_tokenizer, 3, 1)
    monkeypatch.setattr(forward_file, "custom_mask_kind", lambda model: None)
    with pytest.raises(ConfigError, match="data.prefix_sharing: false"):
        module.answer_logps(module.policy, shared)


# ------------------------------------------------------------------------------ K negatives: losses
def test_sdpo_with_one_negative_equals_sigmoid_through_the_module(tiny_model_dir, tiny_tokenizer):
    _, batch = _both_layouts(tiny_tokenizer, 3, 1)
    sdpo, _ = make_module(tiny_model_dir, loss_type="sdpo").pair_losses(batch)
    sigmoid, _ = make_module(tiny_model_dir, loss_type="sigmoid").pair_losses(batch)
    assert (sigmoid - math.log(2)).abs().max() > 1e-4  # a trained-looking policy, not the ln 2 start
    torch.testing.assert_close(sdpo, sigmoid, atol=1e-6, rtol=0)


def test_k_negatives_need_sdpo(tiny_model_dir, tiny_tokenizer):
    _, batch = _both_layouts(tiny_tokenizer, 2, 3)
    with pytest.raises(ConfigError, match="model.loss_type.*sdpo.*--num-negatives 1"):
        make_module(tiny_model_dir, loss_type="sigmoid").pair_losses(batch)
    per_pair, metrics = make_module(tiny_model_dir, loss_type="sdpo").pair_losses(batch)
    assert per_pair.shape == (2,) and metrics["rewards/rejected"].shape == (2,)
