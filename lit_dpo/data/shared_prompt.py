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

The result equals the plain forward up to float rounding (tests/test_shared_prompt.py checks 1e-5 in fp32,
for sdpa and eager attention, LoRA and 4-bit). Wang & Hegde 2024, "Accelerating Direct Preference
Optimization with Prefix Sharing" (arXiv:2410.20305); measured ≈1.8× faster steps on this project's
recommendation data (shared/reference/performance.md).

Batch keys of the layout (the collator stores only integer tensors; the 4D mask is built by the model side
in the dtype its attention needs, see :func:`attention_mask_4d`):
    input_ids: LongTensor [B, T], right-padded.
    attention_mask: LongTensor [B, T], 1 on real tokens (what counts tokens; not given to the model).
    labels: LongTensor [B, T], the token id on answer tokens, -100 on prompt and padding (not shifted).
    position_ids: LongTensor [B, T].
    answer_index: LongTensor [B, T], which answer (0 = chosen, j = rejected_j) a token belongs to; -1 on
        prompt and padding. Its presence marks a batch as shared-layout.
    prompt_count: int, B.
"""

from __future__ import annotations

import torch

from typing import Any

from lit_dpo.data.collate import IGNORE_INDEX, answers_of, extra_fields, pad_completions

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
        prompts = [row["prompt_input_ids"] for row in rows]
        batch: dict[str, Any] = pack_shared_prompt(prompts, [answers_of(row) for row in rows], self.pad_token_id)
        batch["prompt_count"] = len(rows)
        batch.update(extra_fields(rows))
        return batch


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


def attention_mask_4d(answer_index: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The [B, 1, T, T] mask of the shared layout, in the form the attention backend adds or selects with.

    Query i may attend key j iff j <= i and key j is a prompt token or belongs to the same answer as i;
    padding queries get a plain causal row (never all-masked, which would make SDPA return NaN).

    Args:
        answer_index: [B, T] as built by :func:`pack_shared_prompt`.
        attention_mask: [B, T] 1 on real tokens, 0 on padding.
        dtype: None for a boolean mask (True = attend; what SDPA takes); a float dtype for an additive
            mask of 0 / finfo(dtype).min (what eager attention needs: it *adds* the mask to the scores,
            so a boolean mask there would mask nothing).

    Returns:
        The mask, on the device of `answer_index`.
    """
    length = answer_index.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=answer_index.device).tril()
    query, key = answer_index[:, :, None], answer_index[:, None, :]
    prompt_key = (key == -1) & (attention_mask[:, None, :] == 1)
    padding_query = attention_mask[:, :, None] == 0
    allowed = causal & (prompt_key | (key == query) | padding_query)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def predictor_positions(labels: torch.Tensor, answer_index: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each scored token is predicted from: (row, column) of the hidden state whose logits give it.

    A token inside an answer is predicted by the token before it; the first token of an answer by the last
    prompt token, whose column is its position id minus one (prompt columns equal their position ids).

    Args:
        labels: [B, T] token ids on answer tokens, -100 elsewhere.
        answer_index: [B, T] as built by :func:`pack_shared_prompt`.
        position_ids: [B, T] as built by :func:`pack_shared_prompt`.

    Returns:
        `(scored, source)`: `scored` [B, T] bool, the label positions that are scored (all answer tokens
        that have a predictor, i.e. all of them unless the prompt is empty); `source` [N] flat indices into
        the [B * T] hidden states, one per True in `scored` (row-major order).
    """
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    first = (cols == 0) | (answer_index[rows, (cols - 1).clamp(min=0)] != answer_index[rows, cols])
    source_cols = torch.where(first, position_ids[rows, cols] - 1, cols - 1)
    keep = source_cols >= 0  # an empty prompt leaves the first answer token unpredicted, as in the plain layout
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[rows[keep], cols[keep]] = True
    return scored, rows[keep] * labels.shape[1] + source_cols[keep]


def to_plain_layout(batch: dict) -> dict:
    """The same prompts and answers as a plain batch (A row blocks of B rows), for attention backends that
    cannot take a custom 4D mask (e.g. flash_attention_2).

    Args:
        batch: A shared-layout batch (tensors may be on any device).

    Returns:
        `input_ids`, `attention_mask`, `labels` [A * B, T'] (rows: all prompts with answer 0, then all with
        answer 1, ...) and `prompt_count` = B, on the device of the input.
    """
    ids, index, mask = batch["input_ids"].cpu(), batch["answer_index"].cpu(), batch["attention_mask"].cpu()
    count = int(index.max()) + 1
    prompts, completions = [], []
    for j in range(count):
        for b in range(ids.shape[0]):
            prompts.append(ids[b][(index[b] == -1) & (mask[b] == 1)].tolist())
            completions.append(ids[b][index[b] == j].tolist())
    input_ids, attention_mask, labels = pad_completions(prompts, completions, pad_token_id=0)  # any id: masked
    device = batch["input_ids"].device
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
        "prompt_count": ids.shape[0],
    }
