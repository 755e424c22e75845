"""Ranking and generation metrics for candidate-list recommendation, as pure torch / python functions.

The thesis question (does DPO beat SFT on ranking adherence?) is answered with the metrics of S-DPO
(Chen et al. 2024) and LLaRA (Liao et al. 2024): each prompt has K candidate titles and one true item.
Scored evaluation ranks the candidates by the policy's log-prob of each title (HR@k, NDCG@k, MRR);
generative evaluation parses the free-text answer (ValidRatio, HR@1). Definitions follow
``/work/shared/reference/losses.md``. Nothing here imports Lightning, so the evaluator, the report
scripts and the tests can all use it.

Ties are broken pessimistically everywhere: a target tied with other candidates is ranked below all of
them. A constant scorer (or a popularity baseline that has never seen any candidate) therefore scores
like the worst case rather than getting credit for an arbitrary sort order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

from lit_dpo.errors import UserInputError


class EvaluationInputError(UserInputError):
    """Inconsistent evaluation inputs (names the argument and how to fix it)."""


def rank_of_target(scores: Tensor, target_index: int) -> int:
    """1-based rank of the target among K candidates, ties broken pessimistically.

    rank = 1 + number of *other* candidates whose score is >= the target's score.

    Args:
        scores: [K] candidate scores, higher is better.
        target_index: position of the true item in ``scores``.

    Returns:
        The rank in 1..K. Example: scores [0.1, 0.9, 0.5, 0.5], target 2 → 3 (0.9 and the tied 0.5 beat it).
    """
    if scores.dim() != 1:
        raise EvaluationInputError(f"scores: expected shape [K], got {list(scores.shape)}; pass one prompt's scores")
    k = scores.shape[0]
    if not 0 <= int(target_index) < k:
        raise EvaluationInputError(f"target_index: {target_index} is outside 0..{k - 1}; use the true item's position")
    # Counting >= includes the target itself, which supplies the "+1".
    return int((scores >= scores[int(target_index)]).sum())


def _as_lists(
    scores: Sequence[Tensor] | Tensor, target_indices: Sequence[int] | Tensor
) -> tuple[list[Tensor], list[int]]:
    """Validate and normalise to a list of [K_i] tensors and a list of int targets."""
    rows = list(scores.unbind(0)) if isinstance(scores, Tensor) else list(scores)
    targets = [int(t) for t in (target_indices.tolist() if isinstance(target_indices, Tensor) else target_indices)]
    if not rows:
        raise EvaluationInputError("scores: no prompts given; pass at least one candidate-score row")
    if len(rows) != len(targets):
        raise EvaluationInputError(
            f"target_indices: {len(targets)} targets for {len(rows)} score rows; give one target per prompt"
        )
    return rows, targets


def _tie_broken(scores: Tensor, target_index: int) -> Tensor:
    """Strictly ordered stand-in scores placing the target below every candidate tied with it.

    torchmetrics breaks ties by sort order (hit rate, MRR) or averages over them (NDCG), so the raw scores
    would not give the pessimistic rank. Moving the target last, then a stable descending sort, does.
    """
    k = scores.shape[0]
    perm = torch.cat([torch.arange(k)[torch.arange(k) != target_index], torch.tensor([target_index])])
    order = torch.sort(scores.double()[perm], descending=True, stable=True).indices
    preds = torch.empty(k, dtype=torch.float64)
    preds[perm[order]] = torch.arange(k, 0, -1, dtype=torch.float64)
    return preds


def ranking_metrics(
    scores: Sequence[Tensor] | Tensor,
    target_indices: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """HR@k, NDCG@k and MRR over prompts, computed with torchmetrics' retrieval metrics.

    Per prompt with pessimistic rank r: HR@k = [r <= k], NDCG@k = [r <= k] / log2(r + 1), MRR = 1 / r;
    each is averaged over prompts. NDCG@1 equals HR@1, so it is only reported for k > 1.

    Args:
        scores: [N, K] tensor, or a list of N [K_i] tensors (K may differ per prompt); higher is better.
        target_indices: N positions of the true item, one per prompt.
        ks: cut-offs; with the default the keys are hr@1, hr@5, hr@10, ndcg@5, ndcg@10, mrr.

    Returns:
        Metric name → mean over prompts (float in [0, 1]).
    """
    rows, targets = _as_lists(scores, target_indices)
    if not ks or any(int(k) < 1 for k in ks):
        raise EvaluationInputError(f"ks: {tuple(ks)} must be non-empty positive cut-offs, e.g. (1, 5, 10)")
    preds, relevance, indexes = [], [], []
    for i, (row, t) in enumerate(zip(rows, targets)):
        rank_of_target(row, t)  # validates shape and target position with a clear message
        preds.append(_tie_broken(row, t))
        relevance.append(torch.arange(row.shape[0]) == t)
        indexes.append(torch.full((row.shape[0],), i, dtype=torch.long))
    p, r, idx = torch.cat(preds), torch.cat(relevance), torch.cat(indexes)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = float(RetrievalHitRate(top_k=int(k))(p, r, indexes=idx))
    for k in ks:
        if int(k) > 1:
            out[f"ndcg@{k}"] = float(RetrievalNormalizedDCG(top_k=int(k))(p, r, indexes=idx))
    out["mrr"] = float(RetrievalMRR()(p, r, indexes=idx))
    return out


def per_prompt_hits(scores: Sequence[Tensor] | Tensor, target_indices: Sequence[int] | Tensor, k: int = 1) -> Tensor:
    """Whether each prompt's target is in the top k (pessimistic ties); the paired input to McNemar's test.

    Returns:
        [N] bool tensor.
    """
    rows, targets = _as_lists(scores, target_indices)
    return torch.tensor([rank_of_target(row, t) <= k for row, t in zip(rows, targets)], dtype=torch.bool)


def candidate_scores(summed_logps: Tensor, token_counts: Tensor, normalise: bool) -> Tensor:
    """Score of each candidate title: its summed log-prob, or that divided by its token count.

    The summed score favours short titles; the length-normalised one removes that bias. The evaluator
    reports both, as ``<metric>_sum`` and ``<metric>_mean``.

    Args:
        summed_logps: [K] summed log-probs of each candidate's tokens given the prompt.
        token_counts: [K] number of tokens in each candidate (> 0).
        normalise: divide by ``token_counts`` (per-token mean log-prob) when True.

    Returns:
        [K] float scores, higher is better.
    """
    if summed_logps.shape != token_counts.shape:
        raise EvaluationInputError(
            f"token_counts: shape {list(token_counts.shape)} != summed_logps {list(summed_logps.shape)}; "
            "give one count per candidate"
        )
    if not normalise:
        return summed_logps.float()
    if bool((token_counts <= 0).any()):
        raise EvaluationInputError("token_counts: every candidate needs at least one token; drop empty titles")
    return summed_logps.float() / token_counts.float()


def _normalise_text(text: str) -> str:
    """Casefold, collapse whitespace and strip surrounding quotes / trailing periods."""
    text = " ".join(text.casefold().split())
    return text.strip(" \"'`“”‘’").rstrip(".").strip(" \"'`“”‘’")


def parse_answer(text: str, candidates: Sequence[str]) -> str | None:
    """The single candidate a generated answer names, or None when it names none or several.

    Matching is case- and whitespace-insensitive, on word boundaries, and ignores quotes and a trailing
    period. When one title is contained in another ("Toy Story" in "Toy Story 2"), an occurrence inside a
    longer matched title does not count, so "Toy Story 2" names only the sequel while
    "Toy Story or Toy Story 2" names two candidates and is invalid.

    Args:
        text: the model's answer.
        candidates: the K candidate titles shown in the prompt.

    Returns:
        The candidate exactly as given in ``candidates``, or None (an invalid answer).
    """
    answer = _normalise_text(text)
    spans: list[tuple[int, int, str]] = []  # (start, end, normalised title)
    titles: dict[str, str] = {}
    for cand in candidates:
        title = _normalise_text(cand)
        if not title or title in titles:
            continue
        titles[title] = cand
        for m in re.finditer(r"(?<!\w)" + re.escape(title) + r"(?!\w)", answer):
            spans.append((m.start(), m.end(), title))
    named = {
        title
        for start, end, title in spans
        if not any(o != title and s <= start and end <= e and e - s > end - start for s, e, o in spans)
    }
    return titles[named.pop()] if len(named) == 1 else None


def generation_metrics(answers: Sequence[str], candidates: Sequence[Sequence[str]], targets: Sequence[str]) -> dict:
    """ValidRatio and HR@1 of generated answers, with HR@1 reported both ways used in the literature.

    ``hr@1_all`` = correct / all answers (S-DPO); ``hr@1_valid`` = correct / valid answers (LLaRA), 0.0
    when no answer is valid. An answer is valid when :func:`parse_answer` finds exactly one candidate.

    Returns:
        {"valid_ratio", "hr@1_all", "hr@1_valid": float, "n": int}.
    """
    if not (len(answers) == len(candidates) == len(targets)):
        raise EvaluationInputError(
            f"answers/candidates/targets: lengths {len(answers)}/{len(candidates)}/{len(targets)} differ; "
            "give one of each per prompt"
        )
    if not answers:
        raise EvaluationInputError("answers: empty; generate at least one answer before scoring")
    valid = correct = 0
    for answer, cands, target in zip(answers, candidates, targets):
        parsed = parse_answer(answer, cands)
        if parsed is not None:
            valid += 1
            correct += _normalise_text(parsed) == _normalise_text(target)
    n = len(answers)
    return {
        "valid_ratio": valid / n,
        "hr@1_all": correct / n,
        "hr@1_valid": correct / valid if valid else 0.0,
        "n": n,
    }


def random_baseline(num_candidates: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking of K candidates (rank uniform on 1..K).

    HR@k = min(k, K)/K; NDCG@k = (1/K) Σ_{r=1}^{min(k,K)} 1/log2(r+1); MRR = H_K / K (H_K harmonic number).
    Same keys as :func:`ranking_metrics`.
    """
    if int(num_candidates) < 1:
        raise EvaluationInputError(f"num_candidates: {num_candidates} must be >= 1 (the prompt's candidate count)")
    n = int(num_candidates)
    out = {f"hr@{k}": min(int(k), n) / n for k in ks}
    for k in ks:
        if int(k) > 1:
            out[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in range(1, min(int(k), n) + 1)) / n
    out["mrr"] = sum(1 / r for r in range(1, n + 1)) / n
    return out


def popularity_scores(candidates: Sequence[Sequence[str]], train_targets: Sequence[str]) -> list[Tensor]:
    """Popularity baseline: each candidate scores the number of times its title is a training target.

    Titles are compared exactly (they come from the same catalogue). Feed the result to
    :func:`ranking_metrics`; unseen or equally popular candidates tie, and ties count against the target.

    Returns:
        One [K_i] float tensor per prompt.
    """
    counts = Counter(train_targets)
    return [torch.tensor([float(counts[c]) for c in cands], dtype=torch.float32) for cands in candidates]
