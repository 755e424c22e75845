"""Unit tests for lit_dpo.losses: hand-worked numbers, identities, and TRL's formulas transcribed.

The running example (``_example``) is one pair with
    policy_chosen = -5, policy_rejected = -7, reference_chosen = -6, reference_rejected = -6,
    chosen_tokens = 2, rejected_tokens = 4, beta = 0.1,
so r_c = -5 - (-6) = 1, r_r = -7 - (-6) = -1, Δ = r_c - r_r = 2 and βΔ = 0.2.
We write sp(x) = log(1 + e^x) = -log σ(-x); sp(-0.2) = log(1 + 0.8187307531) = 0.5981388693815918 and
sp(0.2) = 0.2 + sp(-0.2) = 0.7981388693815918.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lit_dpo.losses as L
from lit_dpo.losses import (
    LOSS_TYPES,
    LOSSES,
    LossConfig,
    PreferenceLogps,
    preference_loss,
    reward_metrics,
)

SP_NEG_02 = 0.5981388693815918  # sp(-0.2) = -log σ(0.2)
LN2 = 0.6931471805599453


def _logps(pc, pr, rc, rr, ct, rt) -> PreferenceLogps:
    t = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1)  # noqa: E731
    return PreferenceLogps(t(pc), t(pr), t(rc), t(rr), t(ct), t(rt))


def _example() -> PreferenceLogps:
    return _logps(-5.0, -7.0, -6.0, -6.0, 2.0, 4.0)


def _random(b: int = 8, seed: int = 0) -> PreferenceLogps:
    g = torch.Generator().manual_seed(seed)
    r = lambda: -20 * torch.rand(b, generator=g, dtype=torch.float64)  # noqa: E731
    n = lambda: torch.randint(1, 30, (b,), generator=g)  # noqa: E731
    return PreferenceLogps(r(), r(), r(), r(), n(), n())


def _close(actual, expected):
    assert_close(actual, torch.as_tensor([expected], dtype=torch.float64), atol=1e-6, rtol=1e-6)


# --- each loss on the hand-worked example ------------------------------------------------------------


def test_sigmoid_hand_example():
    """-log σ(βΔ) = -log σ(0.2) = sp(-0.2) = 0.5981388693815918."""
    _close(L.sigmoid_loss(_example(), LossConfig(beta=0.1)), SP_NEG_02)


def test_cdpo_hand_example():
    """ε = 0.1: 0.9·sp(-0.2) + 0.1·sp(0.2) = 0.9·sp(-0.2) + 0.1·(0.2 + sp(-0.2)) = sp(-0.2) + 0.02
    = 0.6181388693815918."""
    _close(L.cdpo_loss(_example(), LossConfig(beta=0.1, label_smoothing=0.1)), SP_NEG_02 + 0.02)


def test_robust_hand_example():
    """ε = 0.1: [0.9·sp(-0.2) - 0.1·sp(0.2)] / 0.8 = [0.8·sp(-0.2) - 0.02] / 0.8 = sp(-0.2) - 0.025
    = 0.5731388693815918."""
    _close(L.robust_loss(_example(), LossConfig(beta=0.1, label_smoothing=0.1)), SP_NEG_02 - 0.025)


def test_hinge_hand_example():
    """relu(1 - βΔ) = relu(1 - 0.2) = 0.8."""
    _close(L.hinge_loss(_example(), LossConfig(beta=0.1)), 0.8)


def test_ipo_hand_example():
    """Δ̄ = r_c/|y_c| - r_r/|y_r| = 1/2 - (-1)/4 = 0.75; 1/(2β) = 5; (0.75 - 5)² = 4.25² = 18.0625."""
    _close(L.ipo_loss(_example(), LossConfig(beta=0.1)), 18.0625)


def test_sft_hand_example():
    """-policy_chosen / chosen_tokens = -(-5)/2 = 2.5 (reference and rejected answer unused)."""
    _close(L.sft_loss(_example(), LossConfig()), 2.5)


def test_simpo_hand_example():
    """β = 2, γ = 0.5: ℓ̄_c = -5/2 = -2.5, ℓ̄_r = -7/4 = -1.75; β(ℓ̄_c - ℓ̄_r) - γ = 2·(-0.75) - 0.5 = -2;
    -log σ(-2) = log(1 + e²) = 2.1269280110429727. The reference log-probs play no part."""
    _close(L.simpo_loss(_example(), LossConfig(beta=2.0, simpo_gamma=0.5)), 2.1269280110429727)
    moved_ref = _logps(-5.0, -7.0, 100.0, -100.0, 2.0, 4.0)
    _close(L.simpo_loss(moved_ref, LossConfig(beta=2.0, simpo_gamma=0.5)), 2.1269280110429727)


# --- identities --------------------------------------------------------------------------------------


def test_policy_equals_reference_gives_ln2_zero_rewards_zero_accuracy():
    """A fresh LoRA adapter (policy = reference) ⇒ Δ = 0 ⇒ -log σ(0) = ln 2; rewards 0; strict > gives 0."""
    same = _logps([-3.0, -8.0], [-4.0, -1.0], [-3.0, -8.0], [-4.0, -1.0], [3, 5], [2, 7])
    assert_close(L.sigmoid_loss(same, LossConfig()), torch.full((2,), LN2, dtype=torch.float64))
    m = reward_metrics(same, beta=0.1)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.equal(m[key], torch.zeros(2)), key


@pytest.mark.parametrize("fn", [L.cdpo_loss, L.robust_loss])
def test_label_smoothing_zero_equals_sigmoid(fn):
    logps = _random()
    assert_close(fn(logps, LossConfig(label_smoothing=0.0)), L.sigmoid_loss(logps, LossConfig()))


def test_hinge_at_zero_margin_is_one():
    _close(L.hinge_loss(_logps(-1.0, -2.0, -1.0, -2.0, 1, 1), LossConfig()), 1.0)


def test_ipo_zero_at_target_margin():
    """β = 0.1 ⇒ target Δ̄ = 1/(2β) = 5: r_c = 8 over 2 tokens (4/token), r_r = -4 over 4 tokens (-1/token)."""
    _close(L.ipo_loss(_logps(-2.0, -10.0, -10.0, -6.0, 2, 4), LossConfig(beta=0.1)), 0.0)


def test_sigmoid_gradient_matches_closed_form():
    """d/dπ_c of mean_i -log σ(βΔ_i) = -β·σ(-βΔ_i)/B."""
    logps = _random(b=5)
    pc = logps.policy_chosen.clone().requires_grad_(True)
    loss = L.sigmoid_loss(dataclasses.replace(logps, policy_chosen=pc), LossConfig(beta=0.3))
    loss.mean().backward()
    delta = (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)
    assert_close(pc.grad, -0.3 * torch.sigmoid(-0.3 * delta) / 5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_batch_mean_equals_mean_of_single_pair_calls(loss_type):
    """Equal pair weights: a batch of 8 gives the same loss as 8 accumulated single-pair steps."""
    logps, cfg = _random(b=8, seed=1), LossConfig(beta=0.2, label_smoothing=0.1)
    batch = preference_loss(loss_type, logps, cfg).mean()
    singles = [
        preference_loss(loss_type, PreferenceLogps(*(v[i : i + 1] for v in vars(logps).values())), cfg).mean()
        for i in range(8)
    ]
    assert_close(batch, torch.stack(singles).mean())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_losses_return_per_pair_shape(loss_type):
    assert preference_loss(loss_type, _random(b=3), LossConfig()).shape == (3,)


# --- TRL v1.16.0 formulas, transcribed (TRL keeps them inside DPOTrainer._compute_loss, no standalone fn) -


def test_robust_matches_trl():
    # trl/trainer/dpo_trainer.py v1.16.0, loss_type == "robust":
    #   clean = -(1 - ε)·logsigmoid(β·δ); flipped = -ε·logsigmoid(-β·δ); loss = (clean - flipped) / (1 - 2ε)
    logps, beta, eps = _random(), 0.25, 0.2
    d = (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)
    clean, flipped = -(1 - eps) * F.logsigmoid(beta * d), -eps * F.logsigmoid(-beta * d)
    expected = (clean - flipped) / (1 - 2 * eps)
    assert_close(L.robust_loss(logps, LossConfig(beta=beta, label_smoothing=eps)), expected)


def test_ipo_matches_trl():
    # trl v1.16.0, loss_type == "ipo": scores divided by completion_mask.sum(1).clamp(min=1) before the delta.
    logps, beta = _random(), 0.5
    c = (logps.policy_chosen - logps.reference_chosen) / logps.chosen_tokens.clamp(min=1)
    r = (logps.policy_rejected - logps.reference_rejected) / logps.rejected_tokens.clamp(min=1)
    assert_close(L.ipo_loss(logps, LossConfig(beta=beta)), (c - r - 1 / (2 * beta)) ** 2)


def test_sft_equals_trl_at_batch_size_one_and_differs_otherwise():
    # trl v1.16.0, loss_type == "sft": -chosen_per_token_logps[chosen_mask].mean(), one token-mean over the batch.
    per_token = [torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-0.5] * 6, dtype=torch.float64)]
    logps = _logps([t.sum() for t in per_token], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [2, 6], [1, 1])
    trl_batch = -torch.cat(per_token).mean()  # (3 + 3) / 8 = 0.75
    ours = L.sft_loss(logps, LossConfig())  # per pair 3/2 = 1.5 and 3/6 = 0.5 -> mean 1.0
    assert_close(ours.mean(), torch.tensor(1.0, dtype=torch.float64))
    assert not torch.isclose(ours.mean(), trl_batch)
    for i, t in enumerate(per_token):
        assert_close(ours[i], -t.mean())


def test_simpo_matches_trl_cpo():
    # trl/experimental/cpo/cpo_trainer.py v1.16.0, loss_type == "simpo" (ε = 0, average_log_prob=True):
    #   logits = (ℓ̄_c - ℓ̄_r) - γ/β; loss = -logsigmoid(β·logits)
    logps, beta, gamma = _random(), 2.0, 0.7
    lc, lr = logps.policy_chosen / logps.chosen_tokens, logps.policy_rejected / logps.rejected_tokens
    expected = -F.logsigmoid(beta * ((lc - lr) - gamma / beta))
    assert_close(L.simpo_loss(logps, LossConfig(beta=beta, simpo_gamma=gamma)), expected)


# --- dispatch, config validation, metrics -------------------------------------------------------------


def test_loss_table():
    assert LOSS_TYPES == ("sigmoid", "cdpo", "robust", "hinge", "ipo", "sft", "simpo", "sdpo")
    for name, fn in LOSSES.items():
        assert torch.equal(preference_loss(name, _example(), LossConfig()), fn(_example(), LossConfig()))


def test_unknown_loss_type_lists_choices():
    choices = "sigmoid, cdpo, robust, hinge, ipo, sft, simpo"
    with pytest.raises(ValueError, match=f"unknown loss_type 'dpo'; choose one of: {choices}"):
        preference_loss("dpo", _example(), LossConfig())


@pytest.mark.parametrize(
    "kwargs",
    [{"beta": 0.0}, {"beta": -0.1}, {"beta": math.nan}, {"label_smoothing": 0.5}, {"label_smoothing": -0.1}],
)
def test_loss_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="beta|label_smoothing"):
        LossConfig(**kwargs)


def test_reward_metrics_hand_example():
    """β = 0.1, r_c = 1, r_r = -1 ⇒ rewards 0.1 / -0.1, margin 0.2, accuracy 1; logps are the policy's -5 / -7.
    Second pair: policy = reference ⇒ rewards 0, accuracy 0 (strict >)."""
    logps = _logps([-5.0, -2.0], [-7.0, -3.0], [-6.0, -2.0], [-6.0, -3.0], [2, 1], [4, 1])
    logps = dataclasses.replace(logps, policy_chosen=logps.policy_chosen.requires_grad_(True))
    m = reward_metrics(logps, beta=0.1)
    expected = {
        "rewards/chosen": [0.1, 0.0],
        "rewards/rejected": [-0.1, 0.0],
        "rewards/accuracies": [1.0, 0.0],
        "rewards/margins": [0.2, 0.0],
        "logps/chosen": [-5.0, -2.0],
        "logps/rejected": [-7.0, -3.0],
    }
    assert list(m) == list(expected)
    for key, value in expected.items():
        assert not m[key].requires_grad and m[key].dtype == torch.float32, key
        assert_close(m[key], torch.tensor(value), atol=1e-6, rtol=1e-6)


def test_losses_module_stays_pure():
    """losses.py must import neither Lightning nor peft (STYLE.md rule 2)."""
    tree = ast.parse(Path(L.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m.split(".")[0] for m in names} & {"lightning", "pytorch_lightning", "peft"}


def test_sdpo_with_one_negative_equals_sigmoid():
    """S-DPO eq. 9 at K = 1: -log σ(-β(r_r - r_c)) = -log σ(βΔ)."""
    torch.manual_seed(0)
    b = 6
    logps = PreferenceLogps(
        policy_chosen=torch.randn(b) * 5 - 20, policy_rejected=torch.randn(b) * 5 - 20,
        reference_chosen=torch.randn(b) * 5 - 20, reference_rejected=torch.randn(b) * 5 - 20,
        chosen_tokens=torch.full((b,), 4), rejected_tokens=torch.full((b,), 5),
    )
    config = LossConfig(beta=0.3)
    torch.testing.assert_close(LOSSES["sdpo"](logps, config), LOSSES["sigmoid"](logps, config))


def test_sdpo_two_negatives_by_hand():
    """r_c = -5 - (-6) = 1; r_1 = -7 - (-6) = -1; r_2 = -6 - (-6) = 0; β = 1.
    inner = log(e^{β(r_1 - r_c)} + e^{β(r_2 - r_c)}) = log(e^{-2} + e^{-1}) = -0.686738...
    loss = -log σ(0.686738) = log(1 + e^{-0.686738}) = 0.405784...
    """
    logps = PreferenceLogps(
        policy_chosen=torch.tensor([-5.0]), policy_rejected=torch.tensor([[-7.0, -6.0]]),
        reference_chosen=torch.tensor([-6.0]), reference_rejected=torch.tensor([[-6.0, -6.0]]),
        chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([[2, 2]]),
    )
    inner = math.log(math.exp(-2) + math.exp(-1))
    expected = math.log1p(math.exp(inner))
    torch.testing.assert_close(LOSSES["sdpo"](logps, LossConfig(beta=1.0)), torch.tensor([expected]))


def test_reward_metrics_with_k_negatives_by_hand():
    """K = 2 rejected answers, β = 0.5. Pair 1: r_c = -4 - (-5) = 1, r_r = (-6 - (-5), -3 - (-4)) = (-1, 1)
    ⇒ β·r = 0.5 and (-0.5, 0.5): rewards/rejected = mean = 0, margin = 0.5 - 0 = 0.5, accuracy 0 because
    the chosen reward only ties the second answer. Pair 2: r_c = 2, r_r = (0, -2) ⇒ β·r = 1 and (0, -1):
    rewards/rejected -0.5, margin 1.5, accuracy 1 (beats both). logps/rejected = the policy mean."""
    two = lambda a, b: torch.tensor([a, b], dtype=torch.float64)  # noqa: E731
    logps = PreferenceLogps(
        policy_chosen=two(-4.0, -1.0),
        policy_rejected=torch.tensor([[-6.0, -3.0], [-2.0, -9.0]], dtype=torch.float64),
        reference_chosen=two(-5.0, -3.0),
        reference_rejected=torch.tensor([[-5.0, -4.0], [-2.0, -7.0]], dtype=torch.float64),
        chosen_tokens=two(1, 1),
        rejected_tokens=torch.ones(2, 2),
    )
    m = reward_metrics(logps, beta=0.5)
    expected = {
        "rewards/chosen": [0.5, 1.0],
        "rewards/rejected": [0.0, -0.5],
        "rewards/accuracies": [0.0, 1.0],
        "rewards/margins": [0.5, 1.5],
        "logps/chosen": [-4.0, -1.0],
        "logps/rejected": [-4.5, -5.5],
    }
    for key, value in expected.items():
        assert m[key].shape == (2,) and m[key].dtype == torch.float32, key
        assert_close(m[key], torch.tensor(value), atol=1e-6, rtol=1e-6)
