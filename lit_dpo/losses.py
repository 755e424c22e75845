"""Preference losses and reward metrics, as pure tensor functions of the answers' summed log-probs.

Every DPO-style objective is a function of four summed completion log-probs per pair (policy and reference,
chosen and rejected) plus the completion lengths; `lit_dpo.forward` computes them. Keeping the math here, free of Lightning and peft, lets it
be unit-tested on hand-worked numbers and compared line by line with the reference implementations: TRL
v1.16.0 ``DPOTrainer._compute_loss`` (``trl/trainer/dpo_trainer.py``), TRL's experimental ``CPOTrainer`` for
SimPO, and torchtune v0.6.1 ``torchtune/rlhf/loss/dpo.py``. A new variant is a new function registered in
:data:`LOSSES`, never another ``elif loss_type`` branch.

Notation: r_c = policy_chosen - reference_chosen, r_r likewise, Δ = r_c - r_r, β = ``beta``,
ε = ``label_smoothing``. Each loss returns per-pair losses of shape [B]; a batch's loss is their mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-pair summed completion log-probs, all shape [B].

    ``chosen_tokens``/``rejected_tokens`` count the completion tokens (>0) and are used by the
    length-normalised losses (ipo, sft, simpo); integer or float tensors both work.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor
    reference_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters shared by the losses; each loss reads only the ones it needs."""

    beta: float = 0.1
    """KL strength β (IPO's τ, SimPO's reward scale); 0.1-0.5 typical for DPO, ~2.0 for SimPO."""
    label_smoothing: float = 0.0
    """ε: assumed probability that a preference label is flipped (cdpo, robust)."""
    simpo_gamma: float = 0.5
    """γ: SimPO's target reward margin."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0 (0.1 is typical); got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            # At ε = 0.5 the labels carry no information and robust's 1/(1-2ε) blows up.
            raise ValueError(f"label_smoothing must lie in [0, 0.5) (0.1 is typical); got {self.label_smoothing}")


def _dpo_logits(logps: PreferenceLogps) -> Tensor:
    """Δ = (π_c - ref_c) - (π_r - ref_r), shape [B]."""
    return (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)


def _tokens(n: Tensor) -> Tensor:
    # Clamp as TRL does, so an empty completion gives a finite (zero-gradient) term instead of NaN.
    return n.clamp(min=1)


def sigmoid_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """DPO: -log σ(βΔ). Rafailov et al. 2023, eq. 7; TRL ``loss_type="sigmoid"``."""
    return -F.logsigmoid(config.beta * _dpo_logits(logps))


def cdpo_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """Conservative DPO: -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ).

    Mitchell 2023 (https://ericmitchell.ai/cdpo.pdf), eq. 3; torchtune v0.6.1 ``DPOLoss`` and TRL's
    ``sigmoid`` with ``label_smoothing`` up to v0.2x. TRL 1.16 ``sigmoid`` ignores ``label_smoothing``, so
    cdpo has its own name here. Equals :func:`sigmoid_loss` at ε = 0.
    """
    z = config.beta * _dpo_logits(logps)
    eps = config.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def robust_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """Robust DPO: [-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)] / (1-2ε).

    Chowdhury et al. 2024 (arXiv:2403.00409), eq. 8; TRL ``loss_type="robust"``. Unbiased under labels
    flipped with probability ε; equals :func:`sigmoid_loss` at ε = 0.
    """
    z = config.beta * _dpo_logits(logps)
    eps = config.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def hinge_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """RSO hinge: relu(1 - βΔ). Liu et al. 2023 (arXiv:2309.06657), eq. 5; TRL ``loss_type="hinge"``."""
    return torch.relu(1 - config.beta * _dpo_logits(logps))


def ipo_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """IPO: (Δ̄ - 1/(2β))², with Δ̄ = r_c/|y_c| - r_r/|y_r| from per-token averaged log-ratios.

    Azar et al. 2023 (arXiv:2310.12036), eq. 17 with τ = β; TRL 1.16 ``loss_type="ipo"``, which averages
    per token (confirmed with the IPO authors) so β is comparable across completion lengths.
    torchtune v0.6.1 applies eq. 17 to summed log-ratios instead.
    """
    r_c = (logps.policy_chosen - logps.reference_chosen) / _tokens(logps.chosen_tokens)
    r_r = (logps.policy_rejected - logps.reference_rejected) / _tokens(logps.rejected_tokens)
    return (r_c - r_r - 1 / (2 * config.beta)) ** 2


def sft_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """Token-mean cross-entropy on the chosen completion: -policy_chosen / chosen_tokens per pair.

    TRL 1.16 ``loss_type="sft"`` instead takes one mean over all chosen tokens of the batch,
    -Σ_i logp_i / Σ_i |y_i|, so longer answers weigh more. Ours gives each pair equal weight; the two agree
    when B = 1 or all chosen lengths are equal. Equal pair weights make the loss independent of how a batch
    is split across gradient-accumulation steps and processes. Ignores the reference and the rejected answer.
    """
    return -logps.policy_chosen / _tokens(logps.chosen_tokens)


def simpo_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """SimPO (reference-free): -log σ(β(ℓ̄_c - ℓ̄_r) - γ), ℓ̄ = policy logp / tokens.

    Meng et al. 2024 (arXiv:2405.14734), eq. 6; TRL ``CPOTrainer`` with ``loss_type="simpo"`` and
    ``cpo_alpha=0`` (TRL writes it as β(ℓ̄_c - ℓ̄_r - γ/β)). The paper's β is ~2.0-2.5, not DPO's 0.1.
    """
    lc = logps.policy_chosen / _tokens(logps.chosen_tokens)
    lr = logps.policy_rejected / _tokens(logps.rejected_tokens)
    return -F.logsigmoid(config.beta * (lc - lr) - config.simpo_gamma)


def sdpo_loss(logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """Softmax DPO over K rejected answers: -log σ(-log Σ_j exp(β(r_j - r_c))).

    Chen et al. 2024 (S-DPO, arXiv:2406.09215), eq. 9: the chosen answer must beat all K negatives at
    once. `policy_rejected` / `reference_rejected` may be [B] (K = 1, where this equals sigmoid DPO
    exactly: log Σ over one term is β(r_r - r_c)) or [B, K].
    """
    r_chosen = logps.policy_chosen - logps.reference_chosen
    r_rejected = logps.policy_rejected - logps.reference_rejected
    if r_rejected.dim() == 1:
        r_rejected = r_rejected.unsqueeze(-1)
    return -F.logsigmoid(-torch.logsumexp(config.beta * (r_rejected - r_chosen.unsqueeze(-1)), dim=-1))


LOSSES: dict[str, Callable[[PreferenceLogps, LossConfig], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "sft": sft_loss,
    "simpo": simpo_loss,
    "sdpo": sdpo_loss,
}
LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)


def preference_loss(loss_type: str, logps: PreferenceLogps, config: LossConfig) -> Tensor:
    """Per-pair losses [B] of the named variant; the caller takes ``.mean()`` for the batch loss.

    Raises:
        ValueError: if ``loss_type`` is not one of :data:`LOSS_TYPES`.
    """
    try:
        fn = LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}") from None
    return fn(logps, config)


def reward_metrics(logps: PreferenceLogps, beta: float) -> dict[str, Tensor]:
    """DPO's implicit rewards per pair, under TRL's metric names.

    Values are per pair (shape [B], detached, float) rather than batch means, so the caller can average
    them with the right weights across gradient-accumulation steps and processes. With K rejected answers
    per pair (rejected tensors [B, K], S-DPO) the rejected side is summarised over the K answers.

    Returns:
        ``rewards/chosen`` β·r_c; ``rewards/rejected`` β·r_r (with K answers: the mean over them);
        ``rewards/accuracies`` 1.0 where β·r_c > β·r_r (strict, so ties at initialisation count as 0; with
        K answers: 1.0 only where the chosen reward beats every one of the K); ``rewards/margins``
        β·r_c - β·r_r (with K answers: minus their mean); ``logps/chosen``/``logps/rejected`` the policy's
        summed log-probs (rejected: the mean over the K answers).
    """
    chosen = beta * (logps.policy_chosen - logps.reference_chosen).detach().float()
    rejected = beta * (logps.policy_rejected - logps.reference_rejected).detach().float()
    policy_rejected = logps.policy_rejected.detach().float()
    if rejected.dim() == 1:
        rejected, policy_rejected = rejected.unsqueeze(-1), policy_rejected.unsqueeze(-1)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected.mean(-1),
        "rewards/accuracies": (chosen.unsqueeze(-1) > rejected).all(-1).float(),
        "rewards/margins": chosen - rejected.mean(-1),
        "logps/chosen": logps.policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.mean(-1),
    }
