"""Batching tokenized preference pairs for a single concatenated forward pass.

DPO needs the policy's (and the reference's) log-probabilities of every completion. Stacking the chosen and
rejected sequences into one batch runs them through one forward instead of two, as trl's
`DPOTrainer.concatenated_inputs` and torchtune's `padded_collate_dpo` (v0.6.1, `torchtune/data/_collate.py`) do.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100  # the label value Hugging Face losses (and ours) skip
ID_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# Raw text columns are never passed on: the ids carry the same content and strings bloat every batch.
TEXT_KEYS = ("prompt", "chosen", "rejected")
REFERENCE_KEY = "reference_logps"  # optional per-pair column of reference log-probs, one per answer


class PreferenceCollator:
    """Pads a list of tokenized pairs into one batch of A·B sequences: B prompt+chosen rows, then B
    prompt+rejected rows for each of the K rejected answers (A = 1 + K).

    Input rows hold `prompt_input_ids`, `chosen_input_ids` and `rejected_input_ids` (lists of ints, or for K
    rejected answers a list of K such lists) and optionally extra per-pair fields (`candidates`, `target`).

    Output batch (the plain layout; `lit_dpo.data.shared_prompt` packs the same content with one prompt copy):
        input_ids: LongTensor [A·B, T]; row j·B + i is prompt_i + answer j of pair i (answer 0 = chosen,
            answer j = rejected_j); right-padded with `pad_token_id` to the longest sequence T.
        attention_mask: LongTensor [A·B, T]; 1 on real tokens, 0 on padding.
        labels: LongTensor [A·B, T]; the token id on completion positions and -100 on prompt and padding,
            aligned with input_ids (not shifted: shift by one before comparing with logits).
        prompt_count: int, B.
        every extra field: a list of B values in pair order, under its own key.
        reference_logps (only when the rows carry it): FloatTensor [B, A], the reference log-probs of
            each answer (chosen first), precomputed by `lit_dpo.reference_cache`.

    Args:
        pad_token_id: Token id written into padding positions (masked out, so any valid id works).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, answers, extra = split_rows(rows)
        blocks = range(len(answers[0]))
        completions = [answers[i][j] for j in blocks for i in range(len(rows))]
        input_ids, attention_mask, labels = pad_completions(prompts * len(blocks), completions, self.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {**batch, "prompt_count": len(rows), **extra}


def split_rows(rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[list[int]]], dict[str, Any]]:
    """A list of tokenized pairs as (prompt ids per pair, answers per pair with the chosen one first, the
    extra per-pair fields): what both layouts' collators start from."""
    return [row["prompt_input_ids"] for row in rows], [answers_of(row) for row in rows], extra_fields(rows)


def answers_of(row: dict[str, Any]) -> list[list[int]]:
    """A pair's answers as token-id lists, chosen first: `[chosen, rejected]` or `[chosen, *K rejected]`."""
    rejected = row["rejected_input_ids"]
    negatives = rejected if rejected and isinstance(rejected[0], list) else [rejected]
    return [row["chosen_input_ids"], *negatives]


def extra_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-pair fields other than token ids and raw texts, each as a list of B values in pair order;
    precomputed reference log-probs (`lit_dpo.reference_cache`) as a float tensor [B, A] like `answer_logps`."""
    fields: dict[str, Any] = {key: [row[key] for row in rows] for key in rows[0] if key not in ID_KEYS and key not in TEXT_KEYS}
    if REFERENCE_KEY in fields:
        fields[REFERENCE_KEY] = torch.tensor(fields[REFERENCE_KEY], dtype=torch.float32)
    return fields


def pad_completions(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + completion` rows with labels only on the completion.

    Args:
        prompts: Prompt token ids, one list per row.
        completions: Completion token ids, one list per row (same length as `prompts`).
        pad_token_id: Id written into padding positions (masked out, so any valid id works).

    Returns:
        input_ids, attention_mask, labels: LongTensors [N, T]; labels hold the token id on completion
        positions and -100 on prompt and padding, aligned with input_ids (not shifted).
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(completions), width), dtype=torch.long)
    labels = torch.full((len(completions), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n_total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :n_total] = 1
        labels[i, n_prompt:n_total] = input_ids[i, n_prompt:n_total]
    return input_ids, attention_mask, labels
