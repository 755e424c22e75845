"""The test oracle for answer log-probs: the plain definition over full logits.

`lit_dpo.forward` never builds the [N, T, V] logits (the LM head runs on answer positions only, and the
shared-prompt layout scores several answers in one row); its results are checked against this.
"""

from __future__ import annotations

from torch import Tensor


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the labelled tokens of each sequence, computed in float32.

    Args:
        logits: [N, T, V] causal-LM logits over the full sequence (any float dtype).
        labels: [N, T] token ids aligned with ``input_ids`` (Hugging Face convention), ``ignore_index`` on
            prompt and padding. Shifted here: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        ignore_index: label value excluded from the sum and the count.

    Returns:
        ``(logps, counts)``: float32 [N] sums of log p(label) over counted positions, and int64 [N] numbers
        of counted tokens. A row with every label ignored gives 0 and 0.
    """
    logits = logits[:, :-1].float()  # upcast: bf16 log-softmax loses ~2 digits on long sums
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)  # any valid id; masked out below
    # gather - logsumexp == log_softmax(...).gather(...) without a second [N, T, V] tensor
    token_logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return token_logps.masked_fill(~mask, 0.0).sum(-1), mask.sum(-1)
