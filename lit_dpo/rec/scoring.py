"""Scoring a trained policy on candidate-list recommendation prompts: likelihood ranking, greedy answers, metrics.

The thesis question (does DPO beat SFT on ranking adherence?) needs every run evaluated the same
way on the same prompts. For each prompt this module ranks the K candidate titles by the policy's
log-probability of each title as the completion (tokenized exactly as in training: chat-templated
prompt, title + EOS), optionally lets the policy answer greedily, and turns both into the metrics of
:mod:`lit_dpo.rec.metrics`. The result is what :mod:`lit_dpo.rec.results` writes as `results.json`.

Metric names (all in [0, 1]):
    ``hit@1``: the headline, HR@1 of the summed log-prob ranking. Summed log-prob is the quantity DPO
        and SFT optimise, so it is the score that measures what training changed.
    ``hr@k_sum, ndcg@k_sum, mrr_sum``: ranking by summed log-prob (``hit@1 == hr@1_sum``).
    ``hr@k_mean, ndcg@k_mean, mrr_mean``: ranking by per-token mean log-prob (removes the short-title bias).
    ``valid_ratio, hr@1_all, hr@1_valid``: greedy generation (S-DPO's correct/all, LLaRA's correct/valid).
    ``random_*``: exact expectation of a uniformly random ranking; ``popular_*``: training-target popularity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import torch
from torch import Tensor

from lit_dpo.data.collate import pad_completions
from lit_dpo.data.shared_prompt import pack_shared_prompt
from lit_dpo.data.tokenize import encode_completions, encode_prompts
from lit_dpo.errors import UserInputError
from lit_dpo.forward import custom_mask_kind
from lit_dpo.rec.metrics import (
    candidate_scores,
    generation_metrics,
    parse_answer,
    popularity_scores,
    random_baseline,
    rank_of_target,
    ranking_metrics,
)
from lit_dpo.rec.results import HIT_KEY

KS = (1, 5, 10)
HEADLINE = "sum"  # which score `hit@1` (and so McNemar in the report) uses; see the module docstring


class RankingInputError(UserInputError):
    """A malformed evaluation record (names the record and key, and the fix)."""


# ---------------------------------------------------------------------------------- tokenization
def encode_prompt(tokenizer, prompt: str | Sequence[int], use_chat_template: bool = True) -> list[int]:
    """Prompt token ids exactly as `lit_dpo.data.tokenize.tokenize_batch` builds them (before truncation).

    Args:
        tokenizer: The run's tokenizer.
        prompt: The user message, or its token ids as the data module prepared them (returned as they are).
        use_chat_template: Wrap as one user turn plus the assistant header (training's `chat=True`).

    Returns:
        Token ids; with the chat template no extra special tokens are added (the template has them).
    """
    if not isinstance(prompt, str):
        return list(prompt)
    return list(encode_prompts(tokenizer, [prompt], use_chat_template)[0])


def encode_completion(tokenizer, text: str) -> list[int]:
    """Completion token ids as in training: the text without special tokens, then EOS (the end of the turn)."""
    return list(encode_completions(tokenizer, [text])[0])


@contextlib.contextmanager
def _eval_mode(module) -> Iterator[None]:
    """Eval mode (no LoRA dropout) and no grad, restoring the previous training flag afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _device(module) -> torch.device:
    return next(module.policy.parameters()).device


# ---------------------------------------------------------------------------------------- scoring
def score_candidates(
    module,
    tokenizer,
    prompt: str | Sequence[int],
    candidates: Sequence[str],
    batch_size: int = 32,
    use_chat_template: bool = True,
    prefix_sharing: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed log-prob of each candidate as the completion of `prompt`, and its token count.

    Args:
        module: A configured `DPOModule` (its `policy` is scored, adapters on).
        tokenizer: The run's tokenizer.
        prompt: The user message.
        candidates: K candidate titles; EOS is appended to each, as in training.
        batch_size: Candidates per forward pass.
        use_chat_template: Tokenize the prompt with the chat template, as the run was trained.
        prefix_sharing: Score the candidates of a forward pass as one row, the prompt once followed by
            every candidate (`lit_dpo.data.shared_prompt`; same numbers, the prompt computed once instead
            of once per candidate); False gives one padded prompt + candidate row per candidate. None:
            the shared row whenever the policy's attention takes its custom mask.

    Returns:
        ``(summed, counts)``: float32 [K] summed log-probs (nats) and int64 [K] completion token counts.
    """
    if not candidates:
        raise RankingInputError("candidates: empty list; give each prompt at least one candidate title")
    prompt_ids = encode_prompt(tokenizer, prompt, use_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(module)
    if prefix_sharing is None:  # decided once per call, not per forward
        prefix_sharing = custom_mask_kind(module.policy) is not None
    sums, counts = [], []
    with _eval_mode(module):
        for start in range(0, len(candidates), batch_size):
            completions = encode_completions(tokenizer, list(candidates[start : start + batch_size]))
            # the collators' layouts, so positions match training
            if prefix_sharing:
                batch = pack_shared_prompt([prompt_ids], [completions], pad)
            else:
                keys = ("input_ids", "attention_mask", "labels")
                batch = dict(zip(keys, pad_completions([prompt_ids] * len(completions), completions, pad)))
                batch["prompt_count"] = len(completions)  # each candidate row its own "prompt"
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            summed, count = module.answer_logps(module.policy, batch)
            sums.append(summed.flatten().float().cpu())
            counts.append(count.flatten().cpu())
    return torch.cat(sums), torch.cat(counts)


def generate_answer(module, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 32, use_chat_template: bool = True) -> str:
    """The policy's greedy answer to `prompt` (adapters on): only the new tokens, special tokens stripped."""
    prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt, use_chat_template)], device=_device(module))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _eval_mode(module):
        out = module.policy.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------- evaluation
def _target_index(record: dict, i: int) -> int:
    """Position of the record's target among its candidates, with a fixable error when absent."""
    for key in ("prompt", "candidates", "target"):
        if key not in record:
            raise RankingInputError(f"records[{i}]: missing `{key}`; each record needs prompt, candidates and target")
    cands = list(record["candidates"])
    if record["target"] not in cands:
        raise RankingInputError(
            f"records[{i}].target: {record['target']!r} is not among its candidates; add it to `candidates`"
        )
    return cands.index(record["target"])


def _per_prompt_ranking(scores: Tensor, target: int) -> dict[str, float]:
    """One prompt's HR@k, NDCG@k and MRR from its pessimistic rank (same definitions as `ranking_metrics`)."""
    rank = rank_of_target(scores, target)
    out = {f"hr@{k}": float(rank <= k) for k in KS}
    out.update({f"ndcg@{k}": (1 / math.log2(rank + 1) if rank <= k else 0.0) for k in KS if k > 1})
    out["mrr"] = 1 / rank
    return out


def evaluate_ranking(
    module,
    tokenizer,
    records: Sequence[dict],
    *,
    train_targets: Sequence[str] | None = None,
    generate: bool = True,
    max_new_tokens: int = 32,
    use_chat_template: bool = True,
) -> dict[str, Any]:
    """Likelihood ranking (summed and mean log-prob), greedy generation and baselines on `records`.

    Args:
        module: A configured `DPOModule`.
        tokenizer: The run's tokenizer.
        records: Dicts with `prompt` (str), `candidates` (list[str]), `target` (str, one of the candidates)
            and optionally `prompt_id`/`id` (else the record's position).
        train_targets: Training-set target titles; adds the `popular_*` baseline.
        generate: Also answer each prompt greedily and score the answers (slow on big models).
        max_new_tokens: Generation length cap.
        use_chat_template: Tokenize prompts with the chat template, as the run was trained.

    Returns:
        ``{"headline", "metrics", "per_prompt", "answers"}``: `metrics` maps names (module docstring) to means;
        `per_prompt` has `prompt_ids` plus a 0/1 or [0, 1] list per ranking metric, with `hit@1` the headline;
        `answers` is the list of generated strings (empty without `generate`).
    """
    if not records:
        raise RankingInputError("records: empty; give at least one evaluation record")
    targets = [_target_index(r, i) for i, r in enumerate(records)]
    by_score: dict[str, list[Tensor]] = {"sum": [], "mean": []}
    for record in records:
        summed, counts = score_candidates(module, tokenizer, record["prompt"], list(record["candidates"]), use_chat_template=use_chat_template)
        by_score["sum"].append(candidate_scores(summed, counts, normalise=False))
        by_score["mean"].append(candidate_scores(summed, counts, normalise=True))

    ids = [str(r.get("prompt_id", r.get("id", i))) for i, r in enumerate(records)]
    metrics: dict[str, float] = {}
    per_prompt: dict[str, list] = {"prompt_ids": ids}
    for kind, scores in by_score.items():
        metrics.update({f"{name}_{kind}": v for name, v in ranking_metrics(scores, targets, KS).items()})
        rows = [_per_prompt_ranking(s, t) for s, t in zip(scores, targets)]
        for name in rows[0]:
            per_prompt[f"{name}_{kind}"] = [row[name] for row in rows]
    metrics = {HIT_KEY: metrics[f"hr@1_{HEADLINE}"], **metrics}
    per_prompt[HIT_KEY] = [int(v) for v in per_prompt[f"hr@1_{HEADLINE}"]]

    answers: list[str] = []
    if generate:
        answers = [generate_answer(module, tokenizer, r["prompt"], max_new_tokens, use_chat_template) for r in records]
        gen = generation_metrics(answers, [r["candidates"] for r in records], [r["target"] for r in records])
        metrics.update({k: float(gen[k]) for k in ("valid_ratio", "hr@1_all", "hr@1_valid")})
        parsed = [parse_answer(a, r["candidates"]) for a, r in zip(answers, records)]
        per_prompt["valid_ratio"] = [int(p is not None) for p in parsed]
        # correct/all per prompt; hr@1_valid has another denominator, so it gets no per-prompt list
        per_prompt["hr@1_all"] = [int(p is not None and p == r["target"]) for p, r in zip(parsed, records)]

    randoms = [random_baseline(len(r["candidates"]), KS) for r in records]
    metrics.update({f"random_{k}": sum(b[k] for b in randoms) / len(randoms) for k in randoms[0]})
    if train_targets is not None:
        popular = popularity_scores([r["candidates"] for r in records], list(train_targets))
        metrics.update({f"popular_{k}": v for k, v in ranking_metrics(popular, targets, KS).items()})
    return {"headline": f"{HIT_KEY} = hr@1_{HEADLINE}", "metrics": metrics, "per_prompt": per_prompt, "answers": answers}


def ranking_records(dataset: datasets.Dataset | None) -> list[dict]:
    """Recommendation records of a tokenized split for :func:`evaluate_ranking`.

    Each record holds the tokenized prompt (chat template and truncation exactly as in the pair
    metrics) under `prompt`, plus `candidates`, `target` and a `prompt_id` (the `prompt_id`/`user_id`/`id`
    column, else the row number). Empty when the split has no `candidates`/`target` columns.
    """
    if dataset is None or not {"candidates", "target"} <= set(dataset.column_names):
        return []
    id_column = next((c for c in ("prompt_id", "user_id", "id") if c in dataset.column_names), None)
    columns = ["prompt_input_ids", "candidates", "target"] + ([id_column] if id_column else [])
    rows = dataset.select_columns(columns).to_list()
    return [
        {
            "prompt": row["prompt_input_ids"],
            "candidates": row["candidates"],
            "target": row["target"],
            "prompt_id": str(row[id_column]) if id_column else str(i),
        }
        for i, row in enumerate(rows)
    ]
