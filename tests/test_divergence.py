"""DivergenceGuard: the decisions on synthetic sequences, then a real diverging run through the CLI."""

from __future__ import annotations

import json
import math
import random

import lightning as L
import pytest
import torch
from test_training import run_cli, write_pairs

from lit_dpo.callbacks.divergence import BETA_RULE, FLAT_RULE, LR_RULE, WARMUP_RULE, DivergenceGuard, LossWatch
from lit_dpo.errors import ConfigError

LN2 = math.log(2)


def dpo_like_losses(steps: int, pairs_per_step: int, final_margin: float, spread: float, seed: int) -> list[float]:
    """Step losses of a healthy DPO run: -log σ(margin) averaged over the pairs of a step, with margins
    ~ N(μ_t, s_t) where μ grows from 0 (loss ln 2) to `final_margin`; right-skewed, like real ones."""
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        mu = final_margin * (1 - math.exp(-t / 300))
        s = spread * min(1.0, t / 100 + 0.01)
        out.append(sum(math.log1p(math.exp(-rng.gauss(mu, s))) for _ in range(pairs_per_step)) / pairs_per_step)
    return out


# ------------------------------------------------------------------------------ divergence decision
def test_smooth_decrease_does_not_stop():
    losses = [0.3 + (LN2 - 0.3) * math.exp(-t / 200) for t in range(600)]
    stop, reason, watch = DivergenceGuard().check_divergence(losses)
    assert not stop and reason is None
    assert watch.steps == 600 and watch.best == pytest.approx(losses[-50], abs=0.01)  # median of the last 100


def test_noise_around_a_falling_trend_does_not_stop():
    rng = random.Random(0)
    losses = [0.4 + (LN2 - 0.4) * math.exp(-t / 300) + rng.uniform(-0.02, 0.02) for t in range(1000)]
    assert DivergenceGuard().check_divergence(losses)[:2] == (False, None)


@pytest.mark.parametrize("pairs_per_step, final_margin, spread", [(1, 1.0, 1.5), (1, 3.0, 3.0), (8, 2.0, 2.0)])
def test_default_limits_ignore_the_noise_of_small_dpo_batches(pairs_per_step, final_margin, spread):
    """One pair per step gives a step-loss std of 0.5–0.7 with spikes above 3: still no stop over the
    guide's 2,265 steps (3 epochs × 755)."""
    guard = DivergenceGuard()
    for seed in range(2):
        losses = dpo_like_losses(2265, pairs_per_step, final_margin, spread, seed)
        assert guard.check_divergence(losses)[:2] == (False, None)


def test_a_single_spike_does_not_stop():
    losses = [0.5] * 200
    losses[150] = 25.0
    assert not DivergenceGuard(window=20, patience=3).check_divergence(losses)[0]


def test_steady_rise_above_the_running_minimum_stops_with_a_reason():
    guard = DivergenceGuard()  # limit: max(1.5 × m, m + 0.3)
    losses = [0.5] * 300 + [0.5 + 0.01 * i for i in range(1, 300)]  # +0.3 every 30 steps
    stop, reason, watch = guard.check_divergence(losses)
    assert stop and watch.streak == guard.patience
    assert 300 < watch.steps < 300 + 120  # before the rest of the list: stops at the first diverging step
    assert "running minimum was 0.5 at step" in reason and "above 0.8" in reason
    # fed one loss at a time, as the hook does, it stops at the same step
    watch = LossWatch()
    for loss in losses:
        stop, _, watch = guard.check_divergence([loss], watch)
        if stop:
            break
    assert stop and watch.steps == guard.check_divergence(losses)[2].steps


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_at_once_even_during_warm_up(bad):
    stop, reason, watch = DivergenceGuard(min_steps=20).check_divergence([LN2, 0.68, bad, 0.5])
    assert stop and watch.steps == 3 and reason == f"train/loss is {bad} at step 3"


def test_rise_before_min_steps_is_not_judged():
    assert not DivergenceGuard(min_steps=50, window=5, patience=2).check_divergence([0.3] * 10 + [3.0] * 30)[0]


# ------------------------------------------------------------------------------ flat and slowing
def test_flat_loss_gives_advice_but_no_stop():
    guard = DivergenceGuard()
    rng = random.Random(1)
    losses = [LN2 + rng.uniform(-0.003, 0.003) for _ in range(60)]  # the policy never leaves the reference
    flat, seen = guard.is_flat(losses)
    assert flat and "moved at most 0.00" in seen
    assert not guard.check_divergence(losses)[0]
    learning = [LN2 - 0.002 * t + rng.uniform(-0.003, 0.003) for t in range(60)]
    assert not guard.is_flat(learning)[0]


def test_falling_tokens_per_second_is_slowing():
    rng = random.Random(2)
    guard = DivergenceGuard(speed_window=200)
    speeds = [1000 * (1 - 0.3 * t / 200) * rng.uniform(0.9, 1.1) for t in range(200)]  # a leak: -30%
    slowing, seen = guard.is_slowing(speeds)
    assert slowing and "median by quarter" in seen
    steady = [1000 * rng.uniform(0.8, 1.2) for _ in range(200)]
    assert not guard.is_slowing(steady)[0]
    mild = [1000 * (1 - 0.1 * t / 200) for t in range(200)]  # falls steadily, but only 10%
    assert not guard.is_slowing(mild)[0]


def test_a_slow_first_epoch_alone_raises_no_alarm():
    rng = random.Random(3)
    guard = DivergenceGuard(speed_window=200)
    speeds = [300 * rng.uniform(0.9, 1.1) for _ in range(100)] + [1000 * rng.uniform(0.9, 1.1) for _ in range(300)]
    for end in range(200, len(speeds) + 1, 10):  # judged each step once the window is full
        assert not guard.is_slowing(speeds[:end])[0], end


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"factor": 0.9}, {"patience": 0}, {"min_rise": -1},
                                    {"flat_band": 0}, {"speed_window": 4}, {"slowdown": 1.0}])
def test_bad_arguments_fail_with_the_argument_name(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"DivergenceGuard.{name} must be"):
        DivergenceGuard(**kwargs)


# ------------------------------------------------------------------------------ through the CLI
class RecordWeights(L.Callback):
    """Trainable weights after each optimizer step and at the start of training; each step's loss."""

    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.at_start: dict[str, torch.Tensor] = {}
        self.losses: dict[int, float] = {}
        self.first_batch: tuple[int, int] | None = None  # (epoch, batch index) of the first batch trained

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = _trainable(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.first_batch = self.first_batch or (trainer.current_epoch, batch_idx)
        self.after_step[trainer.global_step] = _trainable(pl_module)
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _callbacks(**guard_args) -> str:
    guard = {"class_path": "lit_dpo.callbacks.divergence.DivergenceGuard",
             "init_args": {"window": 3, "patience": 2, "min_steps": 2, **guard_args}}
    return f"--trainer.callbacks=[{json.dumps({'class_path': 'test_divergence.RecordWeights'})}, {json.dumps(guard)}]"


def _find(cli, cls):
    return next(c for c in cli.trainer.callbacks if isinstance(c, cls))


def test_absurd_learning_rate_stops_keeps_the_last_good_checkpoint_and_resumes(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    # lr 50 alone only saturates the tiny model (loss stuck at ~0.72); with beta 10 the loss jumps above 2
    # At lr 50 Adam turns rounding-level gradient differences into full-size steps, so the trajectory (which
    # step stays healthy) depends on float rounding; the steps asserted below are those of the plain layout.
    diverging = ["--trainer.max_epochs=3", "--model.learning_rate=50", "--model.beta=10", "--model.warmup_steps=5",
                 "--checkpoint.every_n_train_steps=2", "--data.prefix_sharing=false"]
    cli = run_cli(tmp_path, tiny_model_dir, *diverging, _callbacks())
    guard, record = _find(cli, DivergenceGuard), _find(cli, RecordWeights)
    assert cli.trainer.global_step < 36  # 12 steps per epoch × 3
    stop, beta, warmup = guard.findings()[:3]
    assert stop.kind == "stop" and stop.step == cli.trainer.global_step
    assert stop.recommendation == "model.learning_rate: 25 (was 50)"
    assert beta.recommendation == "model.beta: 0.05 (was 10)"
    assert warmup.recommendation == "model.warmup_steps: 20 (was 5)"
    last = tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert str(last) in stop.message and "--ckpt_path last" in stop.message

    # last.ckpt holds the weights of the step the guard rolled back to, from before the loss went up
    good_step, stop_step = guard._stopped["rolled_back_to"], cli.trainer.global_step
    assert good_step < stop_step
    assert record.losses[good_step + 1] < 0.3  # the next step's loss, computed with those weights, was healthy
    assert max(record.losses[s] for s in range(good_step + 2, stop_step + 1)) > 1  # then it rose
    saved = torch.load(last, weights_only=False)
    assert saved["state_dict"].keys() == record.after_step[good_step].keys()
    for name, value in record.after_step[good_step].items():
        assert torch.equal(saved["state_dict"][name], value), name
        assert torch.equal(cli.model.state_dict()[name], value), name  # and so does the model in memory
    assert saved["callbacks"]["DivergenceGuard"]["stops"][0]["rolled_back_to"] == good_step

    # the optimizer state brings lr 50 back, so the resumed run diverges again: what is tested is the loading
    resumed = run_cli(tmp_path, tiny_model_dir, *diverging, "--ckpt_path=last", _callbacks())
    assert resumed.trainer.logger.version == 0  # continued in the same run directory
    assert _find(resumed, RecordWeights).first_batch == divmod(stop_step, 12)  # mid-epoch, where it stopped
    loaded = _find(resumed, RecordWeights).at_start
    assert all(torch.isfinite(v).all() for v in loaded.values())
    for name, value in saved["state_dict"].items():
        assert torch.equal(loaded[name], value), name
    resumed_guard = _find(resumed, DivergenceGuard)
    assert resumed_guard._earlier[0]["step"] == cli.trainer.global_step  # the first stop is history now


def test_a_tiny_learning_rate_gives_flat_advice_and_trains_on(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=8", "--model.learning_rate=1e-9",
                  _callbacks(flat_steps=4))
    assert cli.trainer.global_step == 8  # advice, not a stop
    flat = next(f for f in _find(cli, DivergenceGuard).findings() if f.rule == FLAT_RULE)
    assert flat.kind == "advice" and flat.step == 5  # warm-up 1 + flat_steps 4
    assert flat.recommendation == "model.learning_rate: 2e-09 (was 1e-09) or model.beta: 0.2 (was 0.1)"


def test_state_survives_a_resume_through_a_real_checkpoint(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    common = ["--checkpoint.every_n_train_steps=1", _callbacks(flat_steps=3, speed_window=8)]
    first = _find(run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=10", *common), DivergenceGuard)
    saved = torch.load(tmp_path / "tb_logs/run/version_0/checkpoints/last.ckpt", weights_only=False)
    state = saved["callbacks"]["DivergenceGuard"]
    assert state == first.state_dict()
    assert state["watch"]["steps"] == 10 and len(state["watch"]["recent"]) == 3
    assert state["flat"] == {"step": 4, "flat": False, "seen": state["flat"]["seen"]}  # warm-up 1 + flat_steps 3
    assert len(state["speeds"]) == 8  # steps 2..10, the last 8

    resumed = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=14", "--ckpt_path=last", *common)
    second = _find(resumed, DivergenceGuard)
    assert second._watch.steps == 14  # counted on from the checkpoint, not from 0
    assert second._flat == first._flat  # judged once, in the first part
    assert len(second._speeds) == 8 or second._slowing["slowing"]  # kept filling (a shared CPU may really slow down)
    rules = {f.rule: f.kind for f in second.findings()}
    assert all(rules[rule] == "ok" for rule in (LR_RULE, BETA_RULE, WARMUP_RULE, FLAT_RULE))
