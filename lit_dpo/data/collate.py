"""Batching tokenized preference pairs for a single concatenated forward pass.

DPO needs the policy's (and the reference's) log-probabilities of both completions. Stacking the chosen and
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
    """Pads a list of tokenized pairs into one batch of 2B sequences: B prompt+chosen, then B prompt+rejected.

    Input rows hold `prompt_input_ids`, `chosen_input_ids` and `rejected_input_ids` (lists of ints) and
    optionally extra per-pair fields (for example `candidates`, `target`).

    Output batch:
        input_ids: LongTensor [2B, T]; row i is prompt_i + chosen_i for i < B, prompt_{i-B} + rejected_{i-B}
            for i >= B; right-padded with `pad_token_id` to the longest sequence T.
        attention_mask: LongTensor [2B, T]; 1 on real tokens, 0 on padding.
        labels: LongTensor [2B, T]; the token id on completion positions and -100 on prompt and padding,
            aligned with input_ids (not shifted: shift by one before comparing with logits).
        every extra field: a list of B values in pair order, under its own key.
        reference_logps (only when the rows carry it): FloatTensor [B, A], the reference log-probs of
            each answer (chosen first), precomputed by `lit_dpo.reference_cache`.

    Args:
        pad_token_id: Token id written into padding positions (masked out, so any valid id works).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [row["prompt_input_ids"] for row in rows]
        completions = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        input_ids, attention_mask, labels = pad_completions(prompts + prompts, completions, self.pad_token_id)

        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in rows[0]:
            if key not in ID_KEYS and key not in TEXT_KEYS:
                batch[key] = [row[key] for row in rows]
        if REFERENCE_KEY in batch:  # precomputed by lit_dpo.reference_cache: [B, A] like answer_logps
            batch[REFERENCE_KEY] = torch.tensor(batch[REFERENCE_KEY], dtype=torch.float32)
        return batch


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
