"""The forward pass for shared-prompt batches: one row per prompt, a custom 4D mask, answers scored into [B, A].

The layout itself (what the rows, positions and mask hold, and why the numbers equal the plain layout's)
is described in `lit_dpo.data.shared_prompt`; this file runs a model over it. The mask goes through
transformers' own attention interface: a 4D mask given to the model is used as is
(`transformers.masking_utils._preprocess_mask_arguments` returns it unchanged), so no attention kernel is
written here. SDPA takes a boolean mask; eager attention *adds* the mask to the scores, so it gets
0 / finfo.min floats instead. Backends that take no custom mask (flash_attention_2, ...) are reported by
:func:`custom_mask_kind` as None, and the caller scores the plain layout instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lit_dpo.data.shared_prompt import attention_mask_4d, predictor_positions

MASK_KINDS: dict[str, Literal["bool", "additive"]] = {"sdpa": "bool", "eager": "additive"}


def attention_backend(model: torch.nn.Module) -> str:
    """The model's transformers attention implementation (`sdpa`, `eager`, `flash_attention_2`, ...)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def custom_mask_kind(model: torch.nn.Module) -> Literal["bool", "additive"] | None:
    """How this model's attention takes a custom 4D mask, or None if it takes none."""
    return MASK_KINDS.get(attention_backend(model))


def shared_answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of every answer of a shared-prompt batch, both [B, A].

    As in `DPOModule.completion_logps`, the LM head runs only where an answer token is predicted.

    Args:
        model: A causal LM (or a peft model around one) whose backend takes a custom mask.
        batch: A batch built by `lit_dpo.data.shared_prompt.SharedPromptCollator`.

    Returns:
        `(summed, counts)`: float32 [B, A] summed log-probs (column 0 the chosen answer, then the rejected
        ones) and int64 [B, A] scored-token counts.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    answer_index, labels, positions = batch["answer_index"], batch["labels"], batch["position_ids"]
    additive = custom_mask_kind(model) == "additive"
    mask = attention_mask_4d(answer_index, batch["attention_mask"], _compute_dtype(causal_lm) if additive else None)
    hidden = causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).last_hidden_state
    scored, source = predictor_positions(labels, answer_index, positions)
    logits = causal_lm.get_output_embeddings()(hidden.flatten(0, 1)[source]).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style models squash logits before the softmax
        logits = torch.tanh(logits / softcap) * softcap
    token_logps = -F.cross_entropy(logits, labels[scored], reduction="none")
    rows, cols = scored.nonzero(as_tuple=True)
    answers = int(answer_index.max()) + 1
    slots = rows * answers + answer_index[rows, cols]  # (prompt, answer) of each scored token
    summed = torch.zeros(labels.shape[0] * answers, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(labels.shape[0] * answers, dtype=torch.long, device=labels.device)
    summed = summed.index_add(0, slots, token_logps)
    counts = counts.index_add(0, slots, torch.ones_like(slots))
    return summed.view(-1, answers), counts.view(-1, answers)


def _compute_dtype(causal_lm: torch.nn.Module) -> torch.dtype:
    # The dtype attention scores are computed in: that of the embeddings' output (never quantized by
    # bitsandbytes, whose 4-bit layers compute in this dtype too).
    return causal_lm.get_input_embeddings().weight.dtype
