"""The forward pass that scores answers: summed log-probs and token counts of every answer of a batch, [B, A].

A batch comes in one of two layouts (built by `lit_dpo.data`):

- plain (`lit_dpo.data.collate`): A row blocks of B rows, row j·B + i = prompt_i + answer j;
- shared prompt (`lit_dpo.data.shared_prompt`): one row per prompt, `[prompt | answer 0 | ... | answer A-1]`,
  with position ids restarting after the prompt and a custom 4D attention mask built here.

Both give the same numbers (tests/test_shared_prompt.py: 1e-5 in fp32). Which one a run uses is decided
once, before the data loaders exist (`takes_custom_mask`, see `lit_dpo.cli`): attention backends that
take no custom mask (flash_attention_2, ...) get plain batches. In both, the LM head runs only where an
answer token is predicted: the prompt's logits would be thrown away, and the vocabulary projection is the
largest matmul per token.

The mask goes through transformers' own attention interface: a 4D mask given to the model is used as is
(`transformers.masking_utils` returns it unchanged), so no attention kernel is written here. SDPA takes a
boolean mask; eager attention *adds* the mask to the scores, so it gets 0 / finfo.min floats instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lit_dpo.compat import attention_implementation
from lit_dpo.data.collate import IGNORE_INDEX
from lit_dpo.data.shared_prompt import SHARED_KEY
from lit_dpo.errors import ConfigError

MASK_KINDS: dict[str, Literal["bool", "additive"]] = {"sdpa": "bool", "eager": "additive"}


def takes_custom_mask(attn_implementation: str | None) -> bool:
    """Whether a model loaded with this `attn_implementation` can run the shared-prompt layout.

    None is transformers' default, SDPA where the model supports it and eager attention otherwise: both can.
    """
    return attn_implementation is None or attn_implementation in MASK_KINDS


def custom_mask_kind(model: torch.nn.Module) -> Literal["bool", "additive"] | None:
    """How this model's attention takes a custom 4D mask, or None if it takes none."""
    return MASK_KINDS.get(attention_implementation(model))


def answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of every answer, both [B, A]: column 0 the chosen answer, columns
    1..A-1 the rejected ones (A = 1 + K negatives), for a batch in either layout.

    Raises:
        ConfigError: A shared-prompt batch for a model whose attention takes no custom mask (the layout is
            chosen before training; a batch built for another model reached this one).
    """
    if SHARED_KEY in batch:
        if custom_mask_kind(model) is None:
            raise ConfigError(
                f"model.attn_implementation '{attention_implementation(model)}' cannot take the shared-prompt "
                "layout's custom 4D mask; set data.prefix_sharing: false, or model.attn_implementation: sdpa"
            )
        return shared_answer_logps(model, batch)
    summed, tokens = row_logps(model, batch)
    pairs = batch["prompt_count"] if "prompt_count" in batch else summed.shape[0] // 2
    return summed.view(-1, pairs).T, tokens.view(-1, pairs).T


def row_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and token counts, both [rows], of a plain batch (one answer per row)."""
    causal_lm = _causal_lm(model)
    hidden = causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    predicts = targets != IGNORE_INDEX  # hidden state at t predicts token t + 1
    token_logps = _token_logps(causal_lm, hidden[:, :-1][predicts], targets[predicts])
    rows = predicts.nonzero()[:, 0]
    summed = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return summed.index_add(0, rows, token_logps), predicts.sum(dim=1)


def shared_answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of every answer of a shared-prompt batch, both [B, A].

    Args:
        model: A causal LM (or a peft model around one) whose backend takes a custom mask.
        batch: A batch built by `lit_dpo.data.shared_prompt.SharedPromptCollator`.

    Returns:
        `(summed, counts)`: float32 [B, A] summed log-probs (column 0 the chosen answer, then the rejected
        ones) and int64 [B, A] scored-token counts.
    """
    causal_lm = _causal_lm(model)
    answer_index, labels, positions = batch["answer_index"], batch["labels"], batch["position_ids"]
    additive = custom_mask_kind(model) == "additive"
    mask = attention_mask_4d(answer_index, batch["attention_mask"], _compute_dtype(causal_lm) if additive else None)
    hidden = causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).last_hidden_state
    scored, source = predictor_positions(labels, answer_index, positions)
    token_logps = _token_logps(causal_lm, hidden.flatten(0, 1)[source], labels[scored])
    rows, cols = scored.nonzero(as_tuple=True)
    answers = int(answer_index.max()) + 1
    slots = rows * answers + answer_index[rows, cols]  # (prompt, answer) of each scored token
    summed = torch.zeros(labels.shape[0] * answers, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(labels.shape[0] * answers, dtype=torch.long, device=labels.device)
    summed = summed.index_add(0, slots, token_logps)
    counts = counts.index_add(0, slots, torch.ones_like(slots))
    return summed.view(-1, answers), counts.view(-1, answers)


def attention_mask_4d(answer_index: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The [B, 1, T, T] mask of the shared layout, in the form the attention backend adds or selects with.

    Query i may attend key j iff j <= i and key j is a prompt token or belongs to the same answer as i;
    padding queries get a plain causal row (never all-masked, which would make SDPA return NaN).

    Args:
        answer_index: [B, T] as built by `lit_dpo.data.shared_prompt.pack_shared_prompt`.
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
        answer_index: [B, T] as built by `lit_dpo.data.shared_prompt.pack_shared_prompt`.
        position_ids: [B, T] likewise.

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


def _token_logps(causal_lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each predicting hidden state [N, H] -> [N]: the LM head on these rows only, in float32."""
    logits = causal_lm.get_output_embeddings()(hidden).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2 style models squash logits before the softmax
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, reduction="none")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _compute_dtype(causal_lm: torch.nn.Module) -> torch.dtype:
    # The dtype attention scores are computed in: that of the embeddings' output (never quantized by
    # bitsandbytes, whose 4-bit layers compute in this dtype too).
    return causal_lm.get_input_embeddings().weight.dtype
