"""PlateauEarlyStopping: the stop rule on hand-made per-epoch sequences, then real runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from test_training import run_cli, write_pairs

from lit_dpo.callbacks.findings import step_loss
from lit_dpo.callbacks.plateau import DECREASING_RULE, EARLY_RULE, PLATEAU_RULE, PlateauEarlyStopping
from lit_dpo.errors import ConfigError

CLASS_PATH = "lit_dpo.callbacks.plateau.PlateauEarlyStopping"


def feed(callback: PlateauEarlyStopping, values: list[float]) -> list[bool]:
    """One check per epoch; returns the stop verdict of each."""
    return [callback.decide(v)[0] for v in values]


def first_stop(verdicts: list[bool]) -> int | None:
    """1-based epoch of the first stop, None if it never stopped."""
    return verdicts.index(True) + 1 if True in verdicts else None


def by_rule(callback: PlateauEarlyStopping) -> dict[str, object]:
    return {f.rule: f for f in callback.findings()}


# ------------------------------------------------------------------------------------ decision
def test_steady_decrease_never_stops_and_advises_more_epochs():
    callback = PlateauEarlyStopping()
    callback._run = {"max_epochs": 3, "learning_rate": 5e-5, "beta": 0.1}
    assert feed(callback, [0.69, 0.55, 0.45]) == [False, False, False]
    assert callback.wait_count == 0 and callback.plateau_start_epoch is None
    assert callback.history[2]["improvement"] == pytest.approx(0.10 / 0.55)
    findings = by_rule(callback)
    assert findings[DECREASING_RULE].kind == "advice"
    assert findings[DECREASING_RULE].recommendation == "trainer.max_epochs: 5 (was 3) — still decreasing at epoch 3"
    assert findings[PLATEAU_RULE].kind == "ok" and findings[EARLY_RULE].kind == "ok"


def test_plateau_from_epoch_2_stops_after_patience_and_names_epoch_2():
    callback = PlateauEarlyStopping(patience=2)
    callback._run = {"max_epochs": 5, "learning_rate": 5e-5, "beta": 0.1}
    verdicts = []
    for value in [0.69, 0.50, 0.499, 0.4985]:
        stop, reason = callback.decide(value)
        verdicts.append(stop)
    assert verdicts == [False, False, False, True]  # epoch 3: 1 flat check, epoch 4: patience 2 reached
    assert "plateau began at epoch 2" in reason and callback.plateau_start_epoch == 2
    callback.stopped_epoch = 4  # what the hook records when the stop goes through
    findings = by_rule(callback)
    assert findings[PLATEAU_RULE].kind == "stop"
    assert findings[PLATEAU_RULE].recommendation == "trainer.max_epochs: 2 (was 5)"
    # plateau by epoch 2: the guide's "Loss plateaus early" fixes, with values
    assert findings[EARLY_RULE].kind == "advice"
    assert findings[EARLY_RULE].recommendation == "model.learning_rate: 0.0001 (was 5e-05); model.beta: 0.2 (was 0.1)"
    assert findings[DECREASING_RULE].kind == "ok"


def test_noisy_plateau_below_min_delta_still_stops():
    # after epoch 3 the loss wanders by less than 1% around 0.45: not an improvement, whichever way it goes
    callback = PlateauEarlyStopping(patience=2)
    assert first_stop(feed(callback, [0.69, 0.50, 0.452, 0.455, 0.449, 0.454])) == 5
    assert callback.plateau_start_epoch == 3


def test_min_epochs_is_respected():
    flat = [0.6931, 0.6931, 0.6931, 0.6931]  # flat from epoch 1 (e.g. a learning rate far too low)
    assert first_stop(feed(PlateauEarlyStopping(min_epochs=2), flat)) == 2
    assert first_stop(feed(PlateauEarlyStopping(min_epochs=3), flat)) == 3
    # check_on="steps" in epoch 2 of a run: only 1 epoch completed, so no stop yet under min_epochs=2
    callback = PlateauEarlyStopping(monitor="train/loss", check_on="steps", min_epochs=2)
    callback.decide(0.6931, epoch=1, completed_epochs=0)
    assert callback.decide(0.6931, epoch=2, completed_epochs=1)[0] is False
    assert callback.decide(0.6931, epoch=2, completed_epochs=2)[0] is True


def test_smoothing_judges_the_trend_not_the_noisy_dips():
    # A plateau around 0.45 whose dips keep beating the previous dip by 1.1%: raw values reset patience on
    # every dip; the EMA (0.5) sees a trend of well under 1% per epoch.
    noisy = [0.47, 0.44, 0.47, 0.435, 0.47, 0.43, 0.47, 0.425, 0.47, 0.42]
    assert first_stop(feed(PlateauEarlyStopping(patience=2), noisy)) is None
    smoothed = PlateauEarlyStopping(patience=2, smoothing=0.5)
    assert first_stop(feed(smoothed, noisy)) == 6
    ema = [h["smoothed"] for h in smoothed.history]
    assert ema[:3] == pytest.approx([0.47, 0.455, 0.4625])  # 0.5 · previous + 0.5 · new


def test_min_delta_is_relative():
    # the same 0.005 drop is 1.25% of 0.4 (an improvement) but 0.83% of 0.6 (not one)
    assert feed(PlateauEarlyStopping(min_epochs=0), [0.400, 0.395]) == [False, False]
    assert feed(PlateauEarlyStopping(min_epochs=0), [0.600, 0.595]) == [False, True]
    # scaling the whole curve changes nothing
    curve = [0.69, 0.50, 0.48, 0.477, 0.476]
    assert feed(PlateauEarlyStopping(), curve) == feed(PlateauEarlyStopping(), [100 * v for v in curve])
    # window=2: the improvement is measured against the best two checks back
    callback = PlateauEarlyStopping(window=2)
    assert feed(callback, [0.60, 0.50, 0.46, 0.455, 0.452]) == [False] * 5
    assert callback.history[-1]["improvement"] == pytest.approx((0.46 - 0.452) / 0.46)


def test_mode_max_for_accuracies():
    callback = PlateauEarlyStopping(monitor="val/rewards/accuracies", mode="max")
    assert feed(callback, [0.50, 0.60, 0.70, 0.703]) == [False, False, False, True]
    assert callback.plateau_start_epoch == 3 and callback.best_score == pytest.approx(0.703)
    assert feed(PlateauEarlyStopping(mode="max"), [0.5, 0.6, 0.55]) == [False, False, True]  # worse is no gain


def test_state_dict_round_trip_continues_the_same_decisions(tmp_path):
    values = [0.69, 0.50, 0.499, 0.4985]
    whole = PlateauEarlyStopping(patience=2, smoothing=0.3)
    expected = feed(whole, values)
    first = PlateauEarlyStopping(patience=2, smoothing=0.3)
    feed(first, values[:2])
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = PlateauEarlyStopping(patience=2, smoothing=0.3)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert expected[2:] == feed(second, values[2:])
    assert second.state_dict() == whole.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "mean"}, "mode"),
        ({"min_delta": 1.5}, "min_delta"),
        ({"patience": 0}, "patience"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"check_on": "batch"}, "check_on"),
        ({"check_on": "steps"}, "check_on='epoch'"),  # val/loss is not a per-step metric
        ({"monitor": "train/loss"}, "train/loss_epoch"),  # one step's loss judged once per epoch
    ],
)
def test_bad_arguments_say_how_to_fix_them(kwargs, fragment):
    with pytest.raises(ConfigError, match="PlateauEarlyStopping") as error:
        PlateauEarlyStopping(**kwargs)
    assert fragment in str(error.value)


# ------------------------------------------------------------------------------ through the CLI
def callbacks_arg(*specs: dict) -> str:
    return f"--trainer.callbacks={json.dumps(list(specs))}"


def plateau_of(cli) -> PlateauEarlyStopping:
    return next(c for c in cli.trainer.callbacks if isinstance(c, PlateauEarlyStopping))


def test_cli_run_that_barely_learns_stops_early_and_keeps_best(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl", n=8)  # 6 train pairs: 6 steps per epoch
    # min_progress 0: judge the barely-moving curve as a plateau (the default calls it flat, see below)
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=4", "--model.learning_rate=1e-7",
                  callbacks_arg({"class_path": CLASS_PATH, "init_args": {"min_progress": 0.0}}))
    callback = plateau_of(cli)
    assert cli.trainer.global_step == 12 and callback.stopped_epoch == 2  # stopped after epoch 2 of 4
    assert callback.plateau_start_epoch == 1 and "val/loss" in callback.stopping_reason_message

    best = Path(callback.best_model_path)
    assert best == tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    assert "optimizer_states" not in checkpoint  # the weights to use, not a resume point: small

    findings = by_rule(callback)
    assert findings[PLATEAU_RULE].kind == "stop" and str(best) in findings[PLATEAU_RULE].message
    assert findings[PLATEAU_RULE].recommendation == "trainer.max_epochs: 2 (was 4)"
    assert findings[EARLY_RULE].recommendation == "model.learning_rate: 2e-07 (was 1e-07); model.beta: 0.2 (was 0.1)"
    assert "trainer.max_epochs: 2 (was 4)" in (best.parent.parent / "diagnosis.md").read_text()


def test_a_flat_curve_is_not_stopped_as_a_plateau(tmp_path, tiny_model_dir):
    """Guide: "Bad: Flat (increase LR or beta)" is not "plateaus in epoch 3": stopping would not help."""
    write_pairs(tmp_path / "pairs.jsonl", n=8)
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=4", "--model.learning_rate=1e-7",
                  callbacks_arg({"class_path": CLASS_PATH}))
    callback = plateau_of(cli)
    assert cli.trainer.global_step == 24 and callback.stopped_epoch == 0
    assert callback.start_value == pytest.approx(0.693147, abs=1e-4)


def test_cli_missing_monitor_key_lists_the_available_ones(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl", n=8)
    spec = {"class_path": CLASS_PATH, "init_args": {"monitor": "val/accuracy"}}
    with pytest.raises(ConfigError, match="'val/accuracy' is not logged") as error:
        run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", callbacks_arg(spec))
    assert "val/loss" in str(error.value) and "val/rewards/accuracies" in str(error.value)


class RecordStepLoss(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self._last_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = step_loss(trainer, self._last_step)
        if loss is not None:
            self._last_step = trainer.global_step
            self.losses.append(loss)


def test_cli_steps_mode_checks_the_mean_of_every_n_optimizer_steps(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl", n=8)
    spec = {"class_path": CLASS_PATH,
            "init_args": {"monitor": "train/loss", "check_on": "steps", "check_every_n_steps": 2, "min_delta": 0.0}}
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", "--trainer.accumulate_grad_batches=2",
                  callbacks_arg(spec, {"class_path": "test_plateau.RecordStepLoss"}))
    callback = plateau_of(cli)
    losses = next(c for c in cli.trainer.callbacks if isinstance(c, RecordStepLoss)).losses
    assert len(losses) == 6  # 6 pairs / GA 2 × 2 epochs: once per optimizer step, not per micro-batch
    assert [(h["epoch"], h["step"]) for h in callback.history] == [(1, 2), (2, 4), (2, 6)]
    for i, check in enumerate(callback.history):
        assert check["value"] == pytest.approx(sum(losses[2 * i:2 * i + 2]) / 2)


def test_state_survives_resume(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl", n=8)
    common = ["--trainer.max_epochs=3", "--checkpoint.every_n_train_steps=1", "--model.learning_rate=1e-3"]
    spec = {"class_path": CLASS_PATH, "init_args": {"monitor": "train/loss_epoch", "min_delta": 0.0}}
    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 9}}  # mid epoch 2
    interrupted = plateau_of(run_cli(tmp_path, tiny_model_dir, *common, callbacks_arg(spec, stop)))
    assert [h["epoch"] for h in interrupted.history] == [1]  # the cut-short epoch 2 is not judged

    resumed_cli = run_cli(tmp_path, tiny_model_dir, *common, "--ckpt_path=last", callbacks_arg(spec))
    resumed = plateau_of(resumed_cli)
    assert resumed_cli.trainer.global_step == 18
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == interrupted.history[0]
    # judged after LightningModule.on_train_epoch_end logged this epoch's train/loss_epoch, not the last one's
    assert resumed.history[-1]["value"] == pytest.approx(float(resumed_cli.trainer.callback_metrics["train/loss_epoch"]))
    assert resumed.best_model_path and Path(resumed.best_model_path).is_file()
