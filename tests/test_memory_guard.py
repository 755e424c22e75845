"""MemoryGuard: limits, leak slope and warm-up on scripted readings; hard-limit stop, simulated OOM and
resume through the real CLI on the tiny model; the real CPU reader."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_dpo.callbacks.memory_guard import (
    GB,
    LEAK_RULE,
    NO_OOM_RULE,
    OOM_RULE,
    PEAK_RULE,
    SOFT_RULE,
    MemoryGuard,
    MemorySample,
    cpu_reader,
    is_out_of_memory,
)
from lit_dpo.callbacks.oom_remedies import remedies
from lit_dpo.errors import ConfigError
from test_training import run_cli, write_pairs

GUARD = "lit_dpo.callbacks.memory_guard.MemoryGuard"
SCRIPT: list[float] = []  # GB per reading for `scripted_reader`; the last value repeats


def scripted_reader() -> MemorySample:
    """A 24 GB card whose use follows SCRIPT (one value per reading: setup, then one per step)."""
    gb = SCRIPT.pop(0) if len(SCRIPT) > 1 else SCRIPT[0]
    scripted_reader.peak = max(getattr(scripted_reader, "peak", 0), int(gb * GB))
    return MemorySample(int(gb * GB), scripted_reader.peak, 24 * GB, "cuda:0 (scripted 24 GB card)", int(gb * GB))


class RaiseOOM(L.Callback):
    """Raises a CUDA-style OOM in the backward of micro-batch `at_batch` (stands in for a too-large batch)."""

    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.fit_loop.total_batch_idx == self.at_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.69 GiB total capacity)")


def drive(guard: MemoryGuard, used_gb: list[float]) -> SimpleNamespace:
    """Feed one reading per optimizer step through the guard's hook, as a trainer would."""
    readings = iter(used_gb)
    guard.reader = lambda: MemorySample(int((gb := next(readings)) * GB), int(gb * GB), 24 * GB, "cuda:0")
    guard.resolve_limits(24 * GB)
    trainer = SimpleNamespace(global_step=0, should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    for step in range(1, len(used_gb) + 1):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, None, None, step)
        guard.on_train_batch_end(trainer, None, None, None, step)  # a second micro-batch of the same step: ignored
    return trainer


def guard_of(cli) -> MemoryGuard:
    return next(c for c in cli.trainer.callbacks if isinstance(c, MemoryGuard))


def callbacks_arg(*callbacks: dict) -> str:
    return f"--trainer.callbacks={json.dumps(list(callbacks))}"


# ------------------------------------------------------------------------------- pure decisions
def test_limits_from_fraction_or_gb_and_bad_arguments():
    guard = MemoryGuard(soft_limit_gb=22)  # the guide's "Consistently >22 GB" on a 24 GB card
    guard.resolve_limits(24 * GB)
    assert guard.soft_bytes == 22 * GB and guard.hard_bytes == int(0.97 * 24 * GB)
    assert guard.check_limits(21 * GB) == (None, "")
    assert guard.check_limits(22 * GB)[0] == "soft" and guard.check_limits(24 * GB)[0] == "hard"
    assert "22.00 GB" in guard.check_limits(22.5 * GB)[1]
    with pytest.raises(ConfigError, match="not below hard limit"):
        MemoryGuard(soft_limit_gb=23.5).resolve_limits(24 * GB)
    for bad in [dict(soft_limit=1.5), dict(hard_limit_gb=-1), dict(soft_limit=0.95, hard_limit=0.9), dict(leak_window_steps=3)]:
        with pytest.raises(ConfigError, match="MemoryGuard"):
            MemoryGuard(**bad)
    assert MemoryGuard(soft_limit=None, hard_limit=None).check_limits(10**15) == (None, "")


def test_leak_is_a_steady_ramp_not_fluctuation_or_a_single_jump():
    guard = MemoryGuard(leak_window_steps=40, leak_min_slope_mb_per_step=1.0)
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn(40, generator=gen) * 30).tolist()  # ±30 MB step-to-step fluctuation
    ramp = [1000 + 3 * i + n for i, n in enumerate(noise)]  # +3 MB/step under the noise
    assert guard.leak_slope([0, 2, 4, 6]) == pytest.approx(2.0)
    leaking, reason = guard.is_leaking(ramp)
    assert leaking and "MB/step over the last 40 steps" in reason
    assert guard.is_leaking([1000 + n for n in noise]) == (False, "")  # flat level, fluctuating
    assert not guard.is_leaking([1000.0] * 20 + [1500.0] * 20)[0]  # one jump (a new cache block): not a leak
    assert not guard.is_leaking([1000 + 0.2 * i for i in range(40)])[0]  # steady but below 1 MB/step
    assert not guard.is_leaking(ramp[:39])[0]  # window not full yet


def test_soft_limit_warns_once_and_leak_ignores_warm_up():
    guard = MemoryGuard(soft_limit_gb=20, hard_limit=None, warmup_steps=5, leak_window_steps=8, log_every_n_steps=0)
    # warm-up: steep rise (allocation of optimizer state), then fluctuation over the soft limit twice
    used = [2, 6, 10, 14, 18] + [18.0, 20.5, 18.1, 17.9, 20.6, 18.0, 18.1, 17.9]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = drive(guard, used)
    soft = [w for w in caught if "soft limit" in str(w.message)]
    assert len(soft) == 1 and "step 7" in str(soft[0].message) and not trainer.should_stop
    assert guard.seen["soft_steps"] == 2 and guard.seen["soft_first"] == 7 and guard.seen["steps"] == 13
    assert guard.seen["leak"] is None
    found = {f.rule: f for f in guard.findings()}
    assert found[SOFT_RULE].kind == "advice" and "2 of 13 steps" in found[SOFT_RULE].message
    assert found[LEAK_RULE].kind == "ok" and found[NO_OOM_RULE].kind == "ok"
    assert found[PEAK_RULE].kind == "ok" and "peak 20.60 GB of 24.0 GB (86%)" in found[PEAK_RULE].message


def test_leak_after_warm_up_is_reported_once():
    guard = MemoryGuard(warmup_steps=3, leak_window_steps=8, log_every_n_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive(guard, [1.0] * 3 + [1.0 + 0.01 * i for i in range(12)])  # +10 MB/step
    assert len([w for w in caught if "rose steadily" in str(w.message)]) == 1
    leak = next(f for f in guard.findings() if f.rule == LEAK_RULE)
    assert leak.kind == "advice" and leak.step == 11 and "+10.2 MB/step" in leak.message


def test_oom_detection_and_remedies_keep_the_effective_batch():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))
    balanced = dict(batch_size=1, accumulate=8, world=1, max_length=1024, max_prompt_length=512,
                    model="HuggingFaceTB/SmolLM2-1.7B-Instruct", quantization=None, gradient_checkpointing=False)
    lines = dict(remedies(balanced))
    assert lines["Reduce per_device_train_batch_size"] == "data.batch_size is already 1"
    assert lines["Reduce gradient_accumulation_steps"].startswith("trainer.accumulate_grad_batches: 4 (was 8)")
    assert lines["Reduce max_seq_length"] == "data.max_length: 512 (was 1024); data.max_prompt_length: 256 (was 512)"
    assert "model.quantization: nf4 (was null)" in lines["Use smaller model or different GPU"]
    lines = dict(remedies({**balanced, "batch_size": 4, "accumulate": 1, "quantization": "nf4"}))  # guide's MISTAKE 4
    assert lines["Reduce per_device_train_batch_size"].startswith(
        "data.batch_size: 2 (was 4); trainer.accumulate_grad_batches: 2 (was 1) keeps the effective batch at 4")
    assert lines["Reduce gradient_accumulation_steps"].startswith("keep trainer.accumulate_grad_batches: 1")
    assert "quantization" not in lines["Use smaller model or different GPU"]
    lines = dict(remedies({**balanced, "accumulate": 2}))  # effective batch 2: raise accumulation, it is free
    assert "already below 4" in lines["Reduce gradient_accumulation_steps"]
    assert "trainer.accumulate_grad_batches: 4 (was 2) reaches 4" in lines["Reduce gradient_accumulation_steps"]


def test_cpu_reader_returns_sane_numbers():
    sample = cpu_reader()()
    assert sample.device == "cpu" and sample.reserved_bytes is None
    assert 50 * 2**20 < sample.used_bytes <= sample.peak_bytes < sample.total_bytes  # torch alone is > 50 MB
    assert sample.held_bytes == sample.used_bytes


# --------------------------------------------------------------------------- through the CLI
def test_hard_limit_saves_last_ckpt_stops_and_state_survives_resume(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    SCRIPT[:] = [5.0, 5.0, 21.8, 23.5]  # setup, step 1, step 2 (soft), step 3 (hard: 0.97 × 24 = 23.28 GB)
    guard = {"class_path": GUARD, "init_args": {"soft_limit_gb": 21.5, "reader": "test_memory_guard.scripted_reader"}}
    common = ["--trainer.max_epochs=1", "--trainer.accumulate_grad_batches=2"]  # 12 train pairs: 6 steps
    with pytest.warns(UserWarning, match="hard limit 23.28 GB"):
        cli = run_cli(tmp_path, tiny_model_dir, *common, callbacks_arg(guard))
    run_dir = tmp_path / "tb_logs" / "run" / "version_0"
    assert cli.trainer.global_step == 3 and cli.trainer.should_stop
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not list(run_dir.glob("checkpoints/last-v*.ckpt"))
    stop = {f.rule: f for f in guard_of(cli).findings()}[NO_OOM_RULE]
    assert stop.kind == "stop" and stop.step == 3 and "last.ckpt and stopped" in stop.message

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    assert [round(e.value, 1) for e in events.Scalars("memory/used_gb")] == [5.0, 21.8, 23.5]
    assert "memory/peak_gb" in events.Tags()["scalars"] and "memory/reserved_gb" in events.Tags()["scalars"]

    SCRIPT[:] = [6.0]  # the user lowered the batch size: flat 6 GB from now on
    resumed = run_cli(tmp_path, tiny_model_dir, *common, "--ckpt_path=last", callbacks_arg(guard))
    assert resumed.trainer.global_step == 6 and resumed.trainer.logger.version == 0  # the rest of the epoch
    state = guard_of(resumed)
    assert state.seen["steps"] == 6 and state.seen["soft_steps"] == 2 and state.seen["soft_first"] == 2
    assert state.seen["peak"]["bytes"] == int(23.5 * GB) and state.seen["peak"]["step"] == 3
    found = {f.rule: f for f in state.findings()}
    assert found[NO_OOM_RULE].kind == "advice" and found[NO_OOM_RULE].message.startswith("before the resume:")
    assert found[SOFT_RULE].kind == "advice" and "2 of 6 steps" in found[SOFT_RULE].message


@pytest.mark.parametrize(("at_batch", "guard_saves"), [(1, True), (3, False)], ids=["first-step", "mid-run"])
def test_oom_leaves_resumable_last_ckpt_and_prints_remedies(tmp_path, tiny_model_dir, capsys, caplog, at_batch, guard_saves):
    """batch 2 × GA 2: an OOM in step 1 (no checkpoint yet, ModelCheckpoint skips step 0: MemoryGuard saves)
    or in step 2 (ModelCheckpoint(save_on_exception=True) saves; MemoryGuard does not save twice)."""
    write_pairs(tmp_path / "pairs.jsonl")
    common = ["--trainer.max_epochs=1", "--trainer.accumulate_grad_batches=2", "--data.batch_size=2"]  # 3 steps
    guard = {"class_path": GUARD}
    with pytest.raises(torch.OutOfMemoryError):
        run_cli(tmp_path, tiny_model_dir, *common, callbacks_arg(guard, {"class_path": "test_memory_guard.RaiseOOM",
                                                                         "init_args": {"at_batch": at_batch}}))
    checkpoints = tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and not list(checkpoints.glob("last-v*.ckpt"))
    assert ("MemoryGuard: saved" in caplog.text) == guard_saves
    assert (checkpoints / "step000001.ckpt").is_file() != guard_saves  # ModelCheckpoint's own exception save
    err = capsys.readouterr().err
    assert f"MemoryGuard: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in err
    assert f"in optimizer step {at_batch // 2 + 1}; resumable checkpoint: {checkpoints / 'last.ckpt'}" in err
    assert "├─ Reduce per_device_train_batch_size: data.batch_size: 1 (was 2); trainer.accumulate_grad_batches: 4 (was 2)" in err
    assert "keep trainer.accumulate_grad_batches: 2: halving it takes the effective batch below 4" in err
    assert "Reduce max_seq_length: data.max_length: 512 (was 1024); data.max_prompt_length: 256 (was 512)" in err
    assert "model.gradient_checkpointing: true (was false)" in err and "--ckpt_path last" in err
    if not guard_saves:
        return  # resuming from ModelCheckpoint's own exception checkpoint is Lightning's tested path

    resumed = run_cli(tmp_path, tiny_model_dir, *common, "--ckpt_path=last", callbacks_arg(guard))
    # the epoch is finished; the micro-batches of the interrupted accumulation window are not replayed
    assert resumed.trainer.state.finished and resumed.trainer.current_epoch == 1
    assert resumed.trainer.global_step > at_batch // 2
    oom = next(f for f in guard_of(resumed).findings() if f.rule == OOM_RULE)
    assert oom.kind == "advice" and oom.step == at_batch // 2 + 1 and "before the resume: OutOfMemoryError" in oom.message
