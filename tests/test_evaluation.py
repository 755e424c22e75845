"""Ranking / generation metrics against hand-computed values, torchmetrics against the hand formulas.

Hand-worked examples used below (ranks are 1-based, ties pessimistic):

A. K=4, scores [0.1, 0.9, 0.5, 0.3], target 2 (score 0.5) → rank 2:
   HR@1 0, HR@5 1, HR@10 1, NDCG@5 = NDCG@10 = 1/log2(3) = 0.63093, MRR 1/2.
B. K=4, scores [2.0, 1.0, 0.0, -1.0], target 0 → rank 1: every metric 1.
C. K=12, target scored lowest → rank 12: HR@1/5/10 0, NDCG@5/10 0, MRR 1/12.
D. K=4, all scores equal, target 0 → rank 4 (pessimistic): HR@1 0, HR@5 1, NDCG@5 = 1/log2(5) = 0.43068,
   MRR 1/4.
Mean over A+B+C: HR@1 1/3, HR@5 2/3, NDCG@5 (0.63093 + 1) / 3 = 0.54364, MRR (1/2 + 1 + 1/12) / 3 = 0.52778.
"""

from __future__ import annotations

import math

import pytest
import torch

from lit_dpo.errors import UserInputError
from lit_dpo.rec.metrics import (
    candidate_scores,
    generation_metrics,
    parse_answer,
    per_prompt_hits,
    popularity_scores,
    random_baseline,
    rank_of_target,
    ranking_metrics,
)

A = (torch.tensor([0.1, 0.9, 0.5, 0.3]), 2)
B = (torch.tensor([2.0, 1.0, 0.0, -1.0]), 0)
C = (torch.cat([torch.tensor([-5.0]), torch.arange(11, dtype=torch.float32)]), 0)
D = (torch.full((4,), 0.5), 0)


def hand_metrics(rows, targets, ks=(1, 5, 10)):
    """The formulas of losses.md, written directly from the rank."""
    ranks = [rank_of_target(s, t) for s, t in zip(rows, targets)]
    out = {f"hr@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}
    for k in ks:
        if k > 1:
            out[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks) / len(ranks)
    out["mrr"] = sum(1 / r for r in ranks) / len(ranks)
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


def test_rank_of_target_examples():
    assert rank_of_target(*A) == 2
    assert rank_of_target(*B) == 1
    assert rank_of_target(*C) == 12
    assert rank_of_target(*D) == 4
    # A tie with one other candidate above the target: 0.9 beats it, the tied 0.5 also counts.
    assert rank_of_target(torch.tensor([0.1, 0.9, 0.5, 0.5]), 2) == 3


def test_example_a_hand_values():
    got = ranking_metrics([A[0]], [A[1]])
    ndcg = 1 / math.log2(3)
    assert_close(got, {"hr@1": 0.0, "hr@5": 1.0, "hr@10": 1.0, "ndcg@5": ndcg, "ndcg@10": ndcg, "mrr": 0.5})


def test_example_b_and_c_hand_values():
    keys = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
    assert_close(ranking_metrics([B[0]], [B[1]]), {k: 1.0 for k in keys})
    assert_close(
        ranking_metrics([C[0]], [C[1]]),
        {"hr@1": 0.0, "hr@5": 0.0, "hr@10": 0.0, "ndcg@5": 0.0, "ndcg@10": 0.0, "mrr": 1 / 12},
    )


def test_ties_are_pessimistic():
    got = ranking_metrics([D[0]], [D[1]])
    ndcg = 1 / math.log2(5)
    assert_close(got, {"hr@1": 0.0, "hr@5": 1.0, "hr@10": 1.0, "ndcg@5": ndcg, "ndcg@10": ndcg, "mrr": 0.25})
    # Target position must not matter under a full tie.
    for t in range(4):
        assert ranking_metrics([D[0]], [t])["mrr"] == pytest.approx(0.25)


def test_mean_over_prompts_with_varying_k():
    got = ranking_metrics([A[0], B[0], C[0]], [A[1], B[1], C[1]])
    assert got["hr@1"] == pytest.approx(1 / 3)
    assert got["hr@5"] == pytest.approx(2 / 3)
    assert got["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1) / 3, abs=1e-5)
    assert got["mrr"] == pytest.approx((0.5 + 1 + 1 / 12) / 3, abs=1e-6)


def test_torchmetrics_equals_hand_formula_random_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200, 20), generator=gen).float()  # many ties on purpose
    targets = torch.randint(0, 20, (200,), generator=gen)
    got = ranking_metrics(scores, targets, ks=(1, 3, 5, 10))
    assert_close(got, hand_metrics(list(scores), targets.tolist(), ks=(1, 3, 5, 10)))


def test_per_prompt_hits():
    hits = per_prompt_hits([A[0], B[0], C[0], D[0]], [A[1], B[1], C[1], D[1]], k=1)
    assert hits.dtype == torch.bool and hits.tolist() == [False, True, False, False]
    hits4 = per_prompt_hits([A[0], B[0], C[0], D[0]], [A[1], B[1], C[1], D[1]], k=4)
    assert hits4.tolist() == [True, True, False, True]


def test_bad_inputs_raise_user_errors():
    with pytest.raises(UserInputError, match="target_index"):
        rank_of_target(A[0], 4)
    with pytest.raises(UserInputError, match="target_indices"):
        ranking_metrics([A[0], B[0]], [0])
    with pytest.raises(UserInputError, match="ks"):
        ranking_metrics([A[0]], [0], ks=(0,))


def test_candidate_scores_sum_and_mean():
    summed, counts = torch.tensor([-6.0, -4.0]), torch.tensor([3, 1])
    assert candidate_scores(summed, counts, normalise=False).tolist() == [-6.0, -4.0]
    assert candidate_scores(summed, counts, normalise=True).tolist() == [-2.0, -4.0]  # normalising flips the order
    with pytest.raises(UserInputError, match="token_counts"):
        candidate_scores(summed, torch.tensor([3, 0]), normalise=True)
    with pytest.raises(UserInputError, match="token_counts"):
        candidate_scores(summed, torch.tensor([3]), normalise=True)


CANDS = ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)", "Alien (1979)", "Aliens (1986)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Heat (1995)", "Heat (1995)"),  # exact
        ("  heat   (1995) ", "Heat (1995)"),  # case and whitespace
        ('"Heat (1995)".', "Heat (1995)"),  # quotes and trailing period
        ("I would recommend Heat (1995).", "Heat (1995)"),  # embedded in a sentence
        ("Toy Story 2 (1999)", "Toy Story 2 (1999)"),
        ("toy story (1995)", "Toy Story (1995)"),
        ("Aliens (1986)", "Aliens (1986)"),  # "Alien" is not a word-bounded match inside "Aliens"
        ("The Matrix (1999)", None),  # none
        ("Heat (1995) or Alien (1979)", None),  # two candidates
        ("Toy Story (1995) and Toy Story 2 (1999)", None),  # substring title named on its own as well
        ("", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text, CANDS) == expected


def test_parse_answer_substring_titles_without_years():
    cands = ["Toy Story", "Toy Story 2", "Heat"]
    assert parse_answer("Toy Story 2", cands) == "Toy Story 2"  # longest match wins
    assert parse_answer("Toy Story", cands) == "Toy Story"
    assert parse_answer("Toy Story, then Toy Story 2", cands) is None
    assert parse_answer("Toy Story 2. Toy Story 2 again", cands) == "Toy Story 2"  # same title twice is one


def test_generation_metrics():
    """4 answers: correct, wrong-but-valid, invalid (two titles), invalid (none) → valid 2/4, correct 1."""
    cands = [["A Film", "B Film"]] * 4
    answers = ["A Film", "B Film.", "A Film or B Film", "no idea"]
    got = generation_metrics(answers, cands, ["A Film"] * 4)
    assert got == {"valid_ratio": 0.5, "hr@1_all": 0.25, "hr@1_valid": 0.5, "n": 4}
    assert generation_metrics(["zzz"], [["A Film"]], ["A Film"])["hr@1_valid"] == 0.0
    with pytest.raises(UserInputError, match="answers"):
        generation_metrics(["A Film"], [["A Film"]] * 2, ["A Film"])


def test_random_baseline_exact_values():
    got = random_baseline(4)
    assert got["hr@1"] == 0.25 and got["hr@5"] == 1.0 and got["hr@10"] == 1.0
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert got["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / 4)
    with pytest.raises(UserInputError, match="num_candidates"):
        random_baseline(0)


def test_random_baseline_matches_monte_carlo():
    gen = torch.Generator().manual_seed(1234)
    n, k = 4000, 20
    scores = torch.rand(n, k, generator=gen)  # continuous, so no ties
    targets = torch.randint(0, k, (n,), generator=gen)
    mc = ranking_metrics(scores, targets)
    exact = random_baseline(k)
    assert mc.keys() == exact.keys()
    for key in exact:
        assert mc[key] == pytest.approx(exact[key], abs=0.025), key


def test_popularity_scores_and_ranking():
    train = ["Heat", "Heat", "Heat", "Alien", "Alien", "Toy Story"]
    cands = [["Alien", "Heat", "Fargo"], ["Fargo", "Toy Story", "Casino"], ["Fargo", "Casino"]]
    scores = popularity_scores(cands, train)
    assert [s.tolist() for s in scores] == [[2.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0]]
    # Targets: Alien (rank 2), Toy Story (rank 1), Casino (tied with unseen Fargo → rank 2, pessimistic).
    got = ranking_metrics(scores, [0, 1, 1])
    assert got["hr@1"] == pytest.approx(1 / 3)
    assert got["mrr"] == pytest.approx((0.5 + 1 + 0.5) / 3)
