"""The shared-prompt ("prefix sharing") layout: one row per prompt, every answer attending to one prompt copy.

DPO scores A = 1 + K answers (chosen, then K rejected) after the same prompt. The plain layout repeats the
prompt once per answer (A rows per prompt); with recommendation prompts of ~220 tokens and answers of ~12,
almost all of that compute is the prompt, A times over. The shared layout packs each prompt once:

    row b:  [ prompt | chosen | rejected_1 | ... | rejected_K | padding ]

and makes the forward pass compute exactly what the plain layout computes for every answer:

- attention (a 4D mask [B, 1, T, T], True/0 = may attend): prompt tokens are causal over the prompt; a token
  of answer j sees the whole prompt and the earlier tokens of answer j, never another answer; padding gets
  an ordinary causal row (a row masked everywhere makes SDPA return NaN) and is left out of the loss;
- positions: `position_ids` restart at len(prompt) for every answer, as if it followed the prompt directly;
- prediction: the first token of every answer is predicted by the hidden state of the last *prompt*
  position (not the token just before it in the packed row); later tokens by the token before them.

The result equals the plain forward (`lit_dpo.forward` runs both) up to float rounding (tests/test_shared_prompt.py checks 1e-5 in fp32,
for sdpa and eager attention, LoRA and 4-bit). Wang & Hegde 2024, "Accelerating Direct Preference
Optimization with Prefix Sharing" (arXiv:2410.20305); measured ≈1.8× faster steps on this project's
recommendation data (shared/reference/performance.md).

Batch keys of the layout (the collator stores only integer tensors; the 4D mask is built by the model side
in the dtype its attention needs, `lit_dpo.forward.attention_mask_4d`):
    input_ids: LongTensor [B, T], right-padded.
    attention_mask: LongTensor [B, T], 1 on real tokens (what counts tokens; not given to the model).
    labels: LongTensor [B, T], the token id on answer tokens, -100 on prompt and padding (not shifted).
    position_ids: LongTensor [B, T].
    answer_index: LongTensor [B, T], which answer (0 = chosen, j = rejected_j) a token belongs to; -1 on
        prompt and padding. Its presence marks a batch as shared-layout.
    prompt_count: int, B.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_dpo.data.collate import IGNORE_INDEX, split_rows

SHARED_KEY = "answer_index"  # a batch holding this key is in the shared layout


class SharedPromptCollator:
    """Batches tokenized pairs (one or K rejected answers each) into the shared-prompt layout.

    Input rows as for `lit_dpo.data.collate.PreferenceCollator`; the output holds the keys listed in the
    module docstring plus every extra per-pair field as a list of B values.

    Args:
        pad_token_id: Token id written into padding positions (masked out, so any valid id works).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, answers, extra = split_rows(rows)
        return {**pack_shared_prompt(prompts, answers, self.pad_token_id), "prompt_count": len(rows), **extra}


def pack_shared_prompt(
    prompts: list[list[int]], answers: list[list[list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One right-padded row per prompt: the prompt, then each of its answers.

    Args:
        prompts: Prompt token ids, one list per prompt (B).
        answers: For each prompt, its A answers' token ids (chosen first); A must be the same for all.
        pad_token_id: Id written into padding positions (never attended to by real tokens).

    Returns:
        `input_ids`, `attention_mask`, `labels`, `position_ids`, `answer_index` (all LongTensor [B, T]) as
        described in the module docstring.
    """
    width = max(len(p) + sum(len(a) for a in row) for p, row in zip(prompts, answers))
    shape = (len(prompts), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    answer_index = torch.full(shape, -1, dtype=torch.long)
    for b, (prompt, row) in enumerate(zip(prompts, answers)):
        n_prompt = len(prompt)
        input_ids[b, :n_prompt] = torch.tensor(prompt, dtype=torch.long)
        position_ids[b, :n_prompt] = torch.arange(n_prompt)
        start = n_prompt
        for j, answer in enumerate(row):
            end = start + len(answer)
            input_ids[b, start:end] = torch.tensor(answer, dtype=torch.long)
            labels[b, start:end] = input_ids[b, start:end]
            position_ids[b, start:end] = torch.arange(n_prompt, n_prompt + len(answer))
            answer_index[b, start:end] = j
            start = end
        attention_mask[b, :start] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        "answer_index": answer_index,
    }
