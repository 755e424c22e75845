"""Training through the real CLI on a tiny model: smoke run, resume, gradient accumulation, frozen base."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_dpo.cli import LitDPOCLI


def write_pairs(path: Path, n: int = 16) -> Path:
    with path.open("w") as f:
        for i in range(n):
            row = {
                "prompt": f"The user watched drama {i} and war {i % 3}. Choose one movie:",
                "chosen": f"Star City ({1990 + i % 10})",
                "rejected": f"Dark River ({2000 + i % 7}) and more",
            }
            f.write(json.dumps(row) + "\n")
    return path


def run_cli(tmp_path: Path, model_dir: str, *extra: str, subcommand: str = "fit") -> LitDPOCLI:
    args = [
        subcommand,
        f"--model.model_name_or_path={model_dir}",
        f"--data.train_path={tmp_path / 'pairs.jsonl'}",
        "--data.val_fraction=0.25",
        "--model.learning_rate=5e-3",
        "--model.warmup_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}",
        "--trainer.logger.init_args.name=run",
        "--seed_everything=7",
        *extra,
    ]
    return LitDPOCLI(args=args)


class StopAfterSteps(L.Callback):
    """Stands in for a kill between two optimizer steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class RecordGrads(L.Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def lora_state(cli: LitDPOCLI) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}


def test_fit_writes_logs_checkpoints_config_and_summary(tmp_path, tiny_model_dir, capsys):
    write_pairs(tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", "--trainer.accumulate_grad_batches=2")
    run_dir = tmp_path / "tb_logs" / "run" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    out = capsys.readouterr().out
    assert "lit_dpo fit finished" in out and "reward accuracy" in out and "tensorboard --logdir" in out
    assert "first step loss 0.6931" in out and (run_dir / "summary.txt").is_file()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.trainer.global_step == 12  # 12 train pairs / (batch 1 × GA 2) × 2 epochs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["train/loss", "val/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "train/lr", "train/tokens_per_sec"]:
        assert tag in tags, (tag, sorted(tags))
    assert len(events.Scalars("train/loss")) == 12  # one value per optimizer step, not per micro-batch
    first = events.Scalars("train/loss")[0].value
    assert first == pytest.approx(0.693147, abs=1e-5)  # fresh adapter: policy == reference

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # trainable weights only


def test_lora_changes_while_base_weights_stay_bit_identical(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    write_pairs(tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=4")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = cli.model.policy.get_base_model().state_dict()
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: it moved
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert base.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(base[name], value), name


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl", n=20)
    common = ["--trainer.max_epochs=2", "--trainer.accumulate_grad_batches=2", "--checkpoint.every_n_train_steps=1",
              "--model.lora_dropout=0.1"]  # dropout on: the RNG state must resume too
    full_cli = run_cli(tmp_path, tiny_model_dir, *common)
    full = lora_state(full_cli)

    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 3}}  # mid first epoch
    run_cli(tmp_path, tiny_model_dir, *common, f"--trainer.callbacks=[{json.dumps(stop)}]")
    resumed_cli = run_cli(tmp_path, tiny_model_dir, *common, "--ckpt_path=last")
    assert resumed_cli.trainer.logger.version == 1  # continued in the interrupted run's directory
    resumed = lora_state(resumed_cli)
    assert resumed_cli.trainer.global_step == 16
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6, msg=name)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def epoch_losses(version: int) -> list[float]:
        events = EventAccumulator(str(tmp_path / "tb_logs" / "run" / f"version_{version}")).Reload()
        return [e.value for e in events.Scalars("train/loss_epoch")]

    # the interrupted epoch's mean covers the steps before the interruption too
    # (the stopped session also logged its partial epoch first)
    assert epoch_losses(1)[-2:] == pytest.approx(epoch_losses(0), abs=1e-6) and len(epoch_losses(0)) == 2


def test_gradient_accumulation_matches_a_big_batch(tmp_path, tiny_model_dir):
    """batch 1 × GA 4 and batch 4 × GA 1 give the same first optimizer step (loss and grads)."""
    write_pairs(tmp_path / "pairs.jsonl")
    record = {"class_path": "test_training.RecordGrads"}
    grads = []
    for batch, accumulate in [(4, 1), (1, 4)]:
        cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=1", f"--data.batch_size={batch}",
                      f"--trainer.accumulate_grad_batches={accumulate}", "--model.lora_dropout=0",
                      "--data.group_by_length=false",  # batch 4 would otherwise group its 4 pairs by length
                      f"--trainer.callbacks=[{json.dumps(record)}]")
        recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RecordGrads")
        grads.append(recorder.grads[0])
        # the same 4 pairs in the same order: the sampler's order depends on the seed only
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_validate_and_test_reuse_the_run_and_keep_its_config(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=2")
    run_dir = tmp_path / "tb_logs" / "run" / "version_0"
    fit_config = (run_dir / "config.yaml").read_text()
    cli = run_cli(tmp_path, tiny_model_dir, "--ckpt_path=last", subcommand="test")
    assert "test/loss" in cli.trainer.callback_metrics and "test/rewards/accuracies" in cli.trainer.callback_metrics
    assert (run_dir / "config.yaml").read_text() == fit_config and (run_dir / "config_test.yaml").is_file()


def test_resuming_with_a_halved_learning_rate_takes_effect(tmp_path, tiny_model_dir):
    """The guide's "loss diverges → decrease learning_rate by 2x", applied on resume."""
    write_pairs(tmp_path / "pairs.jsonl")
    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 2}}
    run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", "--model.learning_rate=1e-2",
            f"--trainer.callbacks=[{json.dumps(stop)}]")
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", "--model.learning_rate=5e-3", "--ckpt_path=last")
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == pytest.approx([5e-3])


def test_resume_keeps_every_logger_and_its_settings(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "pairs.jsonl")
    loggers = [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "tb_logs"), "name": "run", "default_hp_metric": False}},
               {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}]
    common = ["--trainer.max_epochs=2", "--checkpoint.every_n_train_steps=1", f"--trainer.logger={json.dumps(loggers)}"]
    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 3}}
    run_cli(tmp_path, tiny_model_dir, *common, f"--trainer.callbacks=[{json.dumps(stop)}]")
    cli = run_cli(tmp_path, tiny_model_dir, *common, "--ckpt_path=last")
    tensorboard, csv = cli.trainer.loggers
    assert type(csv).__name__ == "CSVLogger" and tensorboard.version == 0  # resumed into version_0
    assert cli.trainer.global_step == 24 and not (tmp_path / "tb_logs" / "run" / "version_1").exists()
    assert "hp_metric" not in EventAccumulator(str(tmp_path / "tb_logs" / "run" / "version_0")).Reload().Tags()["scalars"]
