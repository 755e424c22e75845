"""The statistics of a comparison: percentile-bootstrap confidence intervals and McNemar's paired test.

Pure numpy and math, hand-checked in tests/test_report.py: two runs evaluated on a few hundred prompts
differ by noise alone, so every number the report and the sweep compare comes with one of these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lit_dpo.errors import UserInputError
from lit_dpo.rec.results import HIT_KEY

# Below this many discordant pairs the chi-square approximation is poor; use the exact binomial.
EXACT_THRESHOLD = 25
ALPHA = 0.05


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of the mean.

    Args:
        values: Per-prompt metric values (e.g. 0/1 hits or NDCG in [0, 1]).
        n_resamples: Bootstrap resamples; 2000 keeps the interval ends stable to ~0.005.
        confidence: Two-sided coverage, e.g. 0.95.
        seed: RNG seed, so the same inputs always give the same interval.

    Returns:
        `(mean, low, high)` of the sample mean.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise UserInputError("bootstrap_ci: no values; the per-prompt metric list is empty")
    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"bootstrap_ci: confidence={confidence} must be in (0, 1), e.g. 0.95")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    means = arr[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(arr.mean()), float(low), float(high)


def _exact_binomial_two_sided(b: int, c: int) -> float:
    """Exact two-sided sign test p-value: P(X <= min(b, c)) * 2 under Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def mcnemar(
    hits_a: Sequence[int],
    hits_b: Sequence[int],
    ids_a: Sequence[Any] | None = None,
    ids_b: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Paired McNemar test between two runs' per-prompt 0/1 hits on the same test prompts.

    Exact binomial (two-sided) when the discordant count b + c < 25, else chi-square with 1 dof
    and Edwards' continuity correction, `(|b - c| - 1)^2 / (b + c)`.

    Args:
        hits_a: 0/1 per prompt for run A.
        hits_b: 0/1 per prompt for run B, same prompts in the same order.
        ids_a: Optional prompt ids for run A; when both are given they must be equal.
        ids_b: Optional prompt ids for run B.

    Returns:
        Dict with `b` (A right, B wrong), `c` (A wrong, B right), `statistic`, `p_value`, `exact`.

    Raises:
        UserInputError: Lengths or prompt ids differ, or a hit is not 0/1.
    """
    if ids_a is not None and ids_b is not None and list(ids_a) != list(ids_b):
        raise UserInputError(
            "mcnemar: per_prompt.prompt_ids differ between the two runs; evaluate both on the same test set"
        )
    if len(hits_a) != len(hits_b):
        raise UserInputError(
            f"mcnemar: {len(hits_a)} vs {len(hits_b)} per-prompt hits; evaluate both runs on the same test set"
        )
    bad = [h for h in list(hits_a) + list(hits_b) if h not in (0, 1, True, False)]
    if bad:
        raise UserInputError(f"mcnemar: per_prompt.{HIT_KEY} must hold 0/1 values, got {bad[0]!r}")
    b = sum(1 for x, y in zip(hits_a, hits_b) if x and not y)
    c = sum(1 for x, y in zip(hits_a, hits_b) if y and not x)
    if b + c < EXACT_THRESHOLD:
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": _exact_binomial_two_sided(b, c), "exact": True}
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    # Survival function of chi-square with 1 dof: P(X > s) = erfc(sqrt(s / 2)).
    return {"b": b, "c": c, "statistic": float(stat), "p_value": math.erfc(math.sqrt(stat / 2.0)), "exact": False}
