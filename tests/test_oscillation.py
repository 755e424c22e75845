"""OscillationDetector: the detection statistic on synthetic losses, the LR action (cooldown, floor, schedule kept),
its findings, and through the real CLI: the optimizer and scheduler LR really halve and stay halved across a resume."""

from __future__ import annotations

import json
import math
import re
from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from test_training import run_cli, write_pairs

from lit_dpo.callbacks.oscillation import OscillationDetector
from lit_dpo.errors import ConfigError
from lit_dpo.module import linear_warmup_then_decay


def trend(steps: int) -> np.ndarray:
    """A DPO-like falling loss: ln 2 at the start, a little lower after 200 steps."""
    return 0.69 - 0.15 * (1 - np.exp(-np.arange(steps) / 80))


# ------------------------------------------------------------------------------------------- the statistic
@pytest.mark.parametrize("period", [2, 2.5, 3, 4, 6])
def test_a_regular_swing_five_times_the_noise_is_detected(period):
    rng = np.random.default_rng(0)
    t = np.arange(20)
    losses = trend(20) + 0.05 * np.cos(2 * np.pi * t / period + 0.3) + rng.normal(0, 0.01, 20)
    oscillating, reason = OscillationDetector().detect(list(losses))
    assert oscillating, reason
    reported = float(re.search(r"every ([\d.]+) steps", reason).group(1))
    assert reported == pytest.approx(period, abs=0.3)  # the fitted period is reported


def test_a_clean_zigzag_is_detected():
    losses = trend(20) + 0.03 * (-1.0) ** np.arange(20)
    assert OscillationDetector().detect(list(losses))[0]


@pytest.mark.parametrize("curve", ["exponential", "linear", "one_over_t", "flat"])
def test_a_smooth_decrease_is_not_oscillation(curve):
    t = np.arange(40)
    losses = {"exponential": 0.69 * np.exp(-t / 15), "linear": 0.69 - 0.01 * t,
              "one_over_t": 0.3 + 0.39 / (1 + t), "flat": np.full(40, math.log(2))}[curve]
    oscillating, reason = OscillationDetector().detect(list(losses))
    assert not oscillating, reason


@pytest.mark.parametrize("std", [0.01, 0.02, 0.03])
def test_iid_noise_around_a_falling_trend_never_fires(std):
    """DPO step losses at batch 8: std 0.01–0.03 per step. 20 seeds × 181 windows each, no false alarm."""
    detector = OscillationDetector()
    for seed in range(20):
        losses = trend(200) + np.random.default_rng(seed).normal(0, std, 200)
        for end in range(20, 201):
            oscillating, reason = detector.detect(list(losses[end - 20 : end]))
            assert not oscillating, (seed, end, reason)


@pytest.mark.parametrize("where", [0, 5, 10, 19])
@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_a_single_spike_is_not_oscillation(where, noise):
    losses = trend(20) + np.random.default_rng(1).normal(0, noise, 20)
    losses[where] += 0.4
    oscillating, reason = OscillationDetector().detect(list(losses))
    assert not oscillating, reason


def test_ripples_on_a_steep_descent_are_not_oscillation():
    """The loss falls every step; regular bumps on the way down are not the guide's oscillation."""
    t = np.arange(20)
    oscillating, reason = OscillationDetector().detect(list(0.69 - 0.02 * t + 0.004 * np.sin(np.pi * t / 2)))
    assert not oscillating and "bumpy descent" in reason


def test_short_or_non_finite_windows_are_not_judged():
    detector = OscillationDetector()
    assert detector.detect([0.7, 0.6, 0.7]) == (False, "3 steps seen, 20 needed to judge")
    zigzag = list(trend(20) + 0.05 * (-1.0) ** np.arange(20))
    zigzag[7] = float("nan")
    assert detector.detect(zigzag) == (False, "non-finite loss in the window: divergence, not oscillation")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"action": "stop"}, "action"), ({"window": 10}, "window must be >= 2 * max_period + 4 = 16"),
     ({"max_period": 1}, "max_period"), ({"factor": 1.0}, "factor"), ({"min_lr": -1}, "min_lr"),
     ({"min_swing_to_noise": -1}, "min_swing_to_noise")],
)
def test_bad_arguments_fail_with_the_fix(kwargs, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        OscillationDetector(**kwargs)


# ------------------------------------------------------------------------ the action, on a stand-in trainer
class FakeTrainer:
    """What the callback touches: one AdamW + the module's warm-up/decay LambdaLR, metrics and loggers."""

    def __init__(self, lr: float = 5e-5) -> None:
        self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        self.schedule = partial(linear_warmup_then_decay, warmup_steps=5, total_steps=1000)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.optimizers = [self.optimizer]
        self.lr_scheduler_configs = [SimpleNamespace(scheduler=self.scheduler)]
        self.global_step = 0
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
        self.logged: list[tuple[int, dict]] = []
        self.loggers = [SimpleNamespace(log_metrics=lambda metrics, step: self.logged.append((step, metrics)))]
        self.accumulate_grad_batches = 8
        self.datamodule = SimpleNamespace(batch_size=1)
        self.module = SimpleNamespace(hparams={"learning_rate": lr, "beta": 0.1})

    def train(self, callback: OscillationDetector, losses) -> None:
        callback.on_train_start(self, self.module)
        for loss in losses:
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            self.callback_metrics["train/loss"] = torch.tensor(float(loss))
            callback.on_train_batch_end(self, self.module, None, None, 0)
            # the schedule's shape is kept: lr = base_lr * schedule(step), whatever was reduced
            lr = self.optimizer.param_groups[0]["lr"]
            assert lr == pytest.approx(self.scheduler.base_lrs[0] * self.schedule(self.scheduler.last_epoch))


def zigzag(steps: int) -> np.ndarray:
    return trend(steps) + 0.05 * (-1.0) ** np.arange(steps)


@pytest.mark.filterwarnings("ignore:OscillationDetector")
@pytest.mark.parametrize(("cooldown", "expected_steps"), [(30, [20, 50, 80, 110]), (0, [20, 40, 60, 80, 100])])
def test_cooldown_and_a_fresh_window_separate_actions(cooldown, expected_steps):
    trainer, detector = FakeTrainer(), OscillationDetector(cooldown_steps=cooldown, min_lr=0)
    trainer.train(detector, zigzag(110))
    assert [d["step"] for d in detector._detections] == expected_steps
    assert trainer.scheduler.base_lrs[0] == pytest.approx(5e-5 * 0.5 ** len(expected_steps))
    assert trainer.logged[-1] == (expected_steps[-1], {"train/oscillations": len(expected_steps),
                                                        "train/lr_reductions": len(expected_steps)})


@pytest.mark.filterwarnings("ignore:OscillationDetector")
def test_the_learning_rate_never_goes_below_the_floor():
    trainer, detector = FakeTrainer(), OscillationDetector(cooldown_steps=0, min_lr=1e-5)
    trainer.train(detector, zigzag(100))  # 5 detections
    assert [c["new"] for c in detector._lr_changes] == pytest.approx([2.5e-5, 1.25e-5, 1e-5])
    assert len(detector._detections) == 5 and trainer.scheduler.base_lrs[0] == pytest.approx(1e-5)
    lr_finding = detector.findings()[0]
    assert lr_finding.kind == "action" and lr_finding.recommendation == "model.learning_rate: 1e-05 (was 5e-05)"


@pytest.mark.filterwarnings("ignore:OscillationDetector")
def test_warn_only_advises_in_the_guides_words():
    trainer, detector = FakeTrainer(), OscillationDetector(action="warn")
    with pytest.warns(UserWarning, match="Problem: Loss oscillates.*decrease learning_rate.*accumulate_grad_batches=8"):
        trainer.train(detector, zigzag(30))
    assert trainer.scheduler.base_lrs == [5e-5] and detector._lr_changes == []
    lr, accumulation, beta = detector.findings()
    assert (lr.kind, lr.recommendation, lr.step) == ("advice", "model.learning_rate: 2.5e-05 (was 5e-05)", 20)
    assert "Decrease learning_rate" in lr.rule and "oscillated at step(s) 20" in lr.message
    assert accumulation.recommendation == "trainer.accumulate_grad_batches: 16 (was 8)"
    assert "Might be batch size too large" in accumulation.message
    assert (beta.rule, beta.recommendation) == ("BETA: If loss oscillates → decrease to 0.05", "model.beta: 0.05 (was 0.1)")


def test_a_quiet_run_reports_ok_for_each_rule():
    trainer, detector = FakeTrainer(), OscillationDetector()
    trainer.train(detector, trend(60) + np.random.default_rng(0).normal(0, 0.02, 60))
    findings = detector.findings()
    assert [f.kind for f in findings] == ["ok"] * 3 and trainer.scheduler.base_lrs == [5e-5]
    assert "no oscillation in 41 windows of 20 steps" in findings[0].message
    assert "fewer than 20 optimizer steps" in OscillationDetector().findings()[0].message


@pytest.mark.filterwarnings("ignore:OscillationDetector")
def test_state_dict_round_trip_continues_the_same_decisions():
    losses = zigzag(70)
    reference_trainer, reference = FakeTrainer(), OscillationDetector(cooldown_steps=5)
    reference_trainer.train(reference, losses)

    first_trainer, first = FakeTrainer(), OscillationDetector(cooldown_steps=5)
    first_trainer.train(first, losses[:30])
    resumed = OscillationDetector(cooldown_steps=5)
    resumed.load_state_dict(first.state_dict())
    first_trainer.train(resumed, losses[30:])  # same optimizer/scheduler: their own state is Lightning's job
    assert resumed.state_dict() == reference.state_dict()


# ----------------------------------------------------------------------------------------- the real CLI
# Forced detection: no thresholds, so every full 8-step window "oscillates"; with cooldown 0 the detector
# acts at steps 8 and 16 (the window refills after each action).
FORCED = {"class_path": "lit_dpo.callbacks.oscillation.OscillationDetector",
          "init_args": {"window": 8, "max_period": 2, "min_swing_to_noise": 0, "min_reversals": 0,
                        "cooldown_steps": 0, "min_lr": 0}}
LR = 5e-3  # run_cli's learning rate


class RecordLR(L.Callback):
    """After each optimizer step (listed after the detector, so after its action): the LR the next step uses."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[float, float]] = {}  # global_step -> (param group lr, scheduler base lr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.seen[trainer.global_step] = (trainer.optimizers[0].param_groups[0]["lr"], scheduler.base_lrs[0])


def callbacks_arg(*specs: dict) -> str:
    return f"--trainer.callbacks={json.dumps(list(specs))}"


def logged(run_dir, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return {e.step: e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)}


def expected_lr(step: int, total: int = 16) -> float:
    """The LR the optimizer step after `step` completed steps uses: halved once per action at 8, 16."""
    return LR * 0.5 ** (step // 8) * linear_warmup_then_decay(step, warmup_steps=1, total_steps=total)


@pytest.mark.filterwarnings("ignore:OscillationDetector")
def test_reduce_lr_halves_the_optimizer_and_scheduler_lr_and_later_steps_keep_it(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")  # 12 train pairs: 12 steps per epoch
    record = {"class_path": "test_oscillation.RecordLR"}
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=16", callbacks_arg(FORCED, record))
    detector = next(c for c in cli.trainer.callbacks if isinstance(c, OscillationDetector))
    seen = next(c for c in cli.trainer.callbacks if isinstance(c, RecordLR)).seen
    assert [d["step"] for d in detector._detections] == [8, 16]
    for step in range(1, 16):  # optimizer LR and scheduler base LR: full before step 8, halved from it on
        assert seen[step] == pytest.approx((expected_lr(step), LR * 0.5 ** (step // 8))), step
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR / 4])

    run_dir = tmp_path / "tb_logs" / "run" / "version_0"
    lrs = logged(run_dir, "train/lr")  # logged at step s: the LR of optimizer step s + 1
    assert sorted(lrs) == list(range(16))
    for step, lr in lrs.items():
        assert lr == pytest.approx(expected_lr(step), rel=1e-5), step
    assert logged(run_dir, "train/lr_reductions") == {8: 1.0, 16: 2.0}
    assert detector.findings()[0].recommendation == "model.learning_rate: 0.00125 (was 0.005)"


@pytest.mark.filterwarnings("ignore:OscillationDetector")
def test_the_reduction_and_the_detector_state_survive_a_resume(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    common = ["--trainer.max_steps=16", "--checkpoint.every_n_train_steps=5"]
    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 10}}  # after the 1st action
    run_cli(tmp_path, tiny_model_dir, *common, callbacks_arg(FORCED, stop))
    ckpt = torch.load(tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 10
    (saved,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("OscillationDetector")]
    assert saved["lr_changes"] == [{"step": 8, "old": LR, "new": LR / 2}] and len(saved["losses"]) == 2

    cli = run_cli(tmp_path, tiny_model_dir, *common, callbacks_arg(FORCED), "--ckpt_path=last")
    detector = next(c for c in cli.trainer.callbacks if isinstance(c, OscillationDetector))
    # restored: the first action and the 2 losses since it, so the window fills at 16 as without the stop
    # (a fresh detector would wait for 8 new losses, until step 18, after the end)
    assert [d["step"] for d in detector._detections] == [8, 16]
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([LR / 4])
    lrs = logged(tmp_path / "tb_logs" / "run" / "version_0", "train/lr")
    for step in range(10, 16):  # the resumed part runs at the reduced scale from its first step
        assert lrs[step] == pytest.approx(expected_lr(step), rel=1e-5), step
