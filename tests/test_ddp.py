"""Multi-process training (DDP, gloo on CPU) through the real CLI in subprocesses: the same global batch
gives the same logged metrics and LoRA weights as one process, and an interrupted DDP run resumes exactly.

Each run launches `python -m lit_dpo fit` (Lightning's DDP launcher starts the second process by
re-running that command), so these tests take a while: marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training import write_pairs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# every logged scalar that must not depend on how the global batch is split across processes
COMPARED_TAGS = (
    "train/loss", "train/lr", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "train/loss_epoch", "rewards/accuracies_epoch",
    "val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen", "val/logps/rejected",
)


def fit(tmp_path: Path, model_dir: str, name: str, devices: int, batch_size: int, *extra: str,
        config: Path | None = None) -> Path:
    """Run `python -m lit_dpo fit` on `devices` CPU processes; return the run directory."""
    args = [
        sys.executable, "-m", "lit_dpo", "fit",
        *(["--config", str(config)] if config else []),  # first: the arguments below override it
        f"--model.model_name_or_path={model_dir}",
        f"--data.train_path={tmp_path / 'pairs.jsonl'}",
        "--data.val_fraction=0.2",  # 20 pairs: 16 train, 4 val
        f"--data.batch_size={batch_size}",
        # length grouping forms other batches from 2-pair than from 1-pair batches: same global batch needs it off
        "--data.group_by_length=false",
        "--model.learning_rate=5e-3",
        "--model.warmup_steps=1",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        *([] if config else [f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}"]),
        "--trainer.max_epochs=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}",
        f"--trainer.logger.init_args.name={name}",
        "--seed_everything=7",
        *extra,
    ]
    # the worktree's code (and test_training's callbacks) in the launched processes too
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = sorted((tmp_path / "tb_logs" / name).glob("version_*"))
    return runs[-1]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def assert_same_curves(actual: dict, expected: dict, tags=COMPARED_TAGS) -> None:
    for tag in tags:
        assert tag in actual and tag in expected, tag
        assert [s for s, _ in actual[tag]] == [s for s, _ in expected[tag]], tag
        assert [v for _, v in actual[tag]] == pytest.approx([v for _, v in expected[tag]], rel=1e-5, abs=1e-6), tag


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and actual
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_model_dir):
    """2 processes × batch 1 × GA 2 and 1 process × batch 2 × GA 2: global batch 4 either way."""
    write_pairs(tmp_path / "pairs.jsonl", n=20)
    common = ["--trainer.accumulate_grad_batches=2", "--model.lora_dropout=0"]
    single = fit(tmp_path, tiny_model_dir, "single", 1, 2, *common)
    ddp = fit(tmp_path, tiny_model_dir, "ddp", 2, 1, *common)

    expected, actual = scalars(single), scalars(ddp)
    assert len(expected["train/loss"]) == 8 and len(expected["val/loss"]) == 2  # 16 pairs / 4 per step × 2 epochs
    assert expected["train/loss"][0][1] == pytest.approx(0.693147, abs=1e-5)  # fresh adapter: policy == reference
    assert_same_curves(actual, expected)
    assert_same_weights(lora_weights(ddp), lora_weights(single))
    # files are written once, by process 0, into the one run directory
    assert [p.name for p in (tmp_path / "tb_logs" / "ddp").iterdir()] == ["version_0"]
    for name in ("summary.txt", "diagnosis.md", "curves.png", "config.yaml"):
        assert (ddp / name).is_file(), name
    assert len(list(ddp.glob("events.out.tfevents.*"))) == 1


def test_interrupted_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir):
    """Stopped after 3 of 8 steps (mid first epoch) and resumed with --ckpt_path last: same weights and
    curves as the run that was never interrupted. Dropout on, so each process's RNG must resume too.
    Runs configs/strategies/ddp.yaml (on CPU), so that file is exercised end to end."""
    write_pairs(tmp_path / "pairs.jsonl", n=20)
    common = ["--trainer.accumulate_grad_batches=2", "--model.lora_dropout=0.1", "--checkpoint.every_n_train_steps=1"]
    ddp_yaml = REPO / "configs" / "strategies" / "ddp.yaml"
    full = fit(tmp_path, tiny_model_dir, "full", 2, 1, *common, config=ddp_yaml)

    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 3}}
    fit(tmp_path, tiny_model_dir, "resumed", 2, 1, *common, f"--trainer.callbacks=[{json.dumps(stop)}]", config=ddp_yaml)
    resumed = fit(tmp_path, tiny_model_dir, "resumed", 2, 1, *common, "--ckpt_path=last", config=ddp_yaml)
    assert resumed.name == "version_0"  # continued in the interrupted run's directory

    assert_same_weights(lora_weights(resumed), lora_weights(full))
    expected, actual = scalars(full), scalars(resumed)
    step_tags = [t for t in COMPARED_TAGS if t.startswith(("train/loss", "train/lr", "rewards/", "logps/"))]
    assert_same_curves(actual, expected, [t for t in step_tags if not t.endswith("_epoch")])
    # The stopped session validated and logged its partial epoch before it ended, so the resumed run has
    # one more point there; the rest must match, epoch means included (they cover both processes' steps
    # before the interruption: each process's running mean is in the checkpoint).
    for tag in [t for t in COMPARED_TAGS if t.endswith("_epoch") or t.startswith("val/")]:
        tail = actual[tag][-len(expected[tag]):]
        assert_same_curves({tag: tail}, expected, [tag])
