"""The end-of-run diagnosis: written for every ending (finish, stop by a watcher, crash)."""

from __future__ import annotations

import json

import lightning as L
import pytest

from lit_dpo.callbacks.diagnosis import render
from lit_dpo.callbacks.findings import Finding
from test_training import run_cli, write_pairs


class FakeWatcher(L.Callback):
    """Reports a fixed finding; stops training at `stop_at` when given (stands in for a guard)."""

    def __init__(self, stop_at: int = 0) -> None:
        self.stop_at = stop_at
        self.stopped_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_at and trainer.global_step >= self.stop_at and self.stopped_step is None:
            self.stopped_step = trainer.global_step
            trainer.should_stop = True

    def findings(self) -> list[Finding]:
        if self.stopped_step is not None:
            return [Finding("FakeWatcher", "Stop when loss plateaus", "stop", "loss flat since epoch 1",
                            "trainer.max_epochs: 1 (was 3)", self.stopped_step)]
        return [Finding("FakeWatcher", "Loss oscillates → decrease LR", "ok", "no oscillation")]


class Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= 2:
            raise RuntimeError("simulated crash")


def _diagnosis(tmp_path) -> str:
    return next((tmp_path / "tb_logs").rglob("diagnosis.md")).read_text()


def test_render_lists_rules_and_recommendations():
    text = render("Finished after 3 of 3 epoch(s).", [
        Finding("Plateau", "If plateaued by epoch 2 → use 2 epochs", "advice", "plateau from epoch 2", "trainer.max_epochs: 2 (was 3)", 14),
        Finding("Oscillation", "Loss oscillates → decrease LR", "ok", "no oscillation | none"),
    ], {"val/loss": 0.61, "train/tokens_per_sec": 120.0}, 2.5, 8.2)
    assert "`trainer.max_epochs: 2 (was 3)` — If plateaued by epoch 2 → use 2 epochs" in text
    assert "| Loss oscillates → decrease LR | ok (Oscillation) | no oscillation \\| none |" in text
    assert "peak memory: 2.50 GB" in text and "val loss: 0.6100" in text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "Finished after 2 of 2 epoch(s)"),
        ([{"class_path": "test_diagnosis.FakeWatcher", "init_args": {"stop_at": 2}}], "Stopped by FakeWatcher"),
    ],
    ids=["finished", "stopped-by-watcher"],
)
def test_diagnosis_written_for_each_ending(tmp_path, tiny_model_dir, extra, expected):
    write_pairs(tmp_path / "pairs.jsonl")
    callbacks = [{"class_path": "test_diagnosis.FakeWatcher"}] if not extra else extra
    run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", f"--trainer.callbacks={json.dumps(callbacks)}")
    text = _diagnosis(tmp_path)
    assert expected in text
    assert "FakeWatcher" in text and "peak memory" in text


def test_diagnosis_written_when_fit_crashes(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2",
                f"--trainer.callbacks={json.dumps([{'class_path': 'test_diagnosis.Crash'}])}")
    assert "Crashed with RuntimeError: simulated crash" in _diagnosis(tmp_path)
    assert list((tmp_path / "tb_logs").rglob("*.ckpt"))  # the crash left a resumable checkpoint
