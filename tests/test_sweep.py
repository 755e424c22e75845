"""`python -m lit_dpo sweep`: planning, results tables and plots (fast), and real sweeps on the tiny
model through `fit` subprocesses: skip on re-run, resume after a kill, a failing config recorded
(slow), and the epoch reuse being exact with a constant LR schedule (slow)."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lit_dpo import commands as sweep_module
from lit_dpo.commands.sweep import parse_args, plan_sweep
from lit_dpo.sweep.plan import SweepInputError, parse_grid
from lit_dpo.sweep.results import write_results
from lit_dpo.sweep.runs import error_line, load_record, run_dir, save_record

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_config(tmp_path: Path, **model) -> Path:
    config = {
        "trainer": {"max_epochs": 3, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": str(tmp_path / "tb_logs"), "name": "base"}}},
        "model": {"beta": 0.1, "learning_rate": 5e-5, **model},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def planned(tmp_path: Path, *argv: str, **model):
    args, fit_args = parse_args(["sweep", "--config", str(write_config(tmp_path, **model)), *argv])
    return plan_sweep(args, fit_args)


# ------------------------------------------------------------------------------------------ planning
@pytest.mark.parametrize("spec", ["model.beta", "model..beta=0.1,0.2", "model.beta=", "model.beta=0.1,0.1"])
def test_bad_grid_is_one_clear_error(spec):
    with pytest.raises(SweepInputError, match="--grid"):
        parse_grid(spec)


def test_main_reports_bad_input_in_one_line(tmp_path, capsys):
    assert sweep_module.main(["sweep", "--config", str(tmp_path / "missing.yaml"), "--grid", "model.beta=0.1"]) == 2
    assert capsys.readouterr().err.strip().startswith("lit_dpo: error: --config")


def test_one_at_a_time_runs_the_base_once_and_keeps_versions(tmp_path):
    sweep = planned(tmp_path, "--grid", "model.beta=0.05,0.1,0.2", "--grid", "model.learning_rate=1e-5,5e-5")
    ids = [run.run_id for run in sweep.runs]
    assert ids == ["model.beta=0.05", "base", "model.beta=0.2", "model.learning_rate=1e-5"]
    assert sweep.name == "base-sweep-beta-learning_rate" and sweep.directory == tmp_path / "tb_logs" / sweep.name
    assert sweep.runs[3].values == {"model.beta": 0.1, "model.learning_rate": 1e-5}
    assert [run.version for run in sweep.runs] == [0, 1, 2, 3]
    # a wider grid later keeps every known run's version and appends the new ones
    again = planned(tmp_path, "--grid", "model.beta=0.2,0.5,0.05,0.1", "--grid", "model.learning_rate=1e-5,5e-5")
    assert {r.run_id: r.version for r in again.runs} == {
        "model.beta=0.2": 2, "model.beta=0.5": 4, "model.beta=0.05": 0, "base": 1, "model.learning_rate=1e-5": 3}


def test_product_and_extra_fit_arguments(tmp_path):
    sweep = planned(tmp_path, "--grid", "model.beta=0.1,0.2", "--grid", "trainer.max_epochs=1,3", "--product",
                    "--name", "grid", "--devices-per-run", "2", "--", "--data.synthetic_num_pairs=16")
    assert [r.run_id for r in sweep.runs] == ["trainer.max_epochs=1", "base", "model.beta=0.2,trainer.max_epochs=1",
                                              "model.beta=0.2"]
    assert sweep.fit_args == ["--data.synthetic_num_pairs=16", "--trainer.devices=2"]
    with pytest.raises(SweepInputError, match="model.beta: given both"):
        planned(tmp_path, "--grid", "model.beta=0.1,0.2", "--model.beta=0.3")


def test_epoch_reuse_only_when_exact_unless_opted_in(tmp_path):
    grid = ("--grid", "trainer.max_epochs=1,2,3,5")
    linear = planned(tmp_path, *grid, "--name", "a")
    assert all(run.reuse_of is None for run in linear.runs)  # linear decay: epoch 2 of 5 != a 2-epoch run
    approx = planned(tmp_path, *grid, "--name", "b", "--epoch-reuse", "approximate")
    assert [(r.reuse_of, r.reuse_exact) for r in approx.runs] == [("trainer.max_epochs=5", False)] * 3 + [(None, True)]
    constant = planned(tmp_path, *grid, "--name", "c", lr_scheduler_type="constant_with_warmup")
    assert [(r.reuse_of, r.reuse_exact) for r in constant.runs] == [("trainer.max_epochs=5", True)] * 3 + [(None, True)]
    assert all(r.reuse_of is None for r in planned(tmp_path, *grid, "--name", "d", "--epoch-reuse", "off",
                                                   lr_scheduler_type="constant_with_warmup").runs)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    config = write_config(tmp_path, lr_scheduler_type="constant_with_warmup")
    argv = ["sweep", "--config", str(config), "--grid", "trainer.max_epochs=1,3", "--grid", "seed_everything=1,2", "--dry-run"]
    assert sweep_module.main(argv) == 0
    out = capsys.readouterr().out
    assert "version_0  trainer.max_epochs=1  <- epoch checkpoint of base (exact)" in out and "version_3  seed_everything=2" in out
    assert json.loads((tmp_path / "tb_logs" / "base-sweep-max_epochs-seed_everything" / "sweep.json").read_text())["versions"]
    assert not list((tmp_path / "tb_logs").rglob("version_*"))


def test_error_line_prefers_lit_dpo_message(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("$ python -m lit_dpo fit\nsome output\nlit_dpo: error: model.beta must be > 0 (got 0.0)\n")
    assert error_line(log) == "model.beta must be > 0 (got 0.0)"
    log.write_text("Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: CUDA out of memory\n")
    assert error_line(log) == "RuntimeError: CUDA out of memory"


# ------------------------------------------------------------------------------------- results
def fake_run(sweep, run, losses, hits, flags=()):
    from torch.utils.tensorboard import SummaryWriter

    directory = run_dir(sweep, run)
    writer = SummaryWriter(str(directory))
    for step, loss in enumerate(losses):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("val/loss", loss + 0.01, step)
    writer.add_scalar("val/rewards/accuracies", 0.5 + 0.1 * len(flags), len(losses) - 1)
    writer.add_scalar("val/rewards/margins", 0.2, len(losses) - 1)
    writer.close()
    findings = [{"source": s, "kind": k, "rule": "", "message": "", "recommendation": "", "step": 1} for s, k in flags]
    (directory / "diagnosis.json").write_text(json.dumps({"findings": findings, "peak_memory_gb": 1.5}))
    (directory / "results.json").write_text(json.dumps(
        {"metrics": {"hit@1": sum(hits) / len(hits)},
         "per_prompt": {"prompt_ids": [str(i) for i in range(len(hits))], "hit@1": hits}}))
    save_record(sweep, run, {"run_id": run.run_id, "status": "done", "attempts": 1, "wall_s": 12.5, "error": None})


def test_results_csv_markdown_plots_and_best_run(tmp_path):
    sweep = planned(tmp_path, "--grid", "model.beta=0.05,0.1,0.2")
    fake_run(sweep, sweep.runs[0], [0.69, 0.6, 0.5], [1, 0] * 20)
    fake_run(sweep, sweep.runs[1], [0.69, 0.65, 0.62], [1, 1, 1, 0] * 10, flags=[("OscillationDetector", "action")])
    save_record(sweep, sweep.runs[2], {"run_id": sweep.runs[2].run_id, "status": "failed", "attempts": 1,
                                       "wall_s": 3.0, "error": "model.beta must be > 0"})
    text = write_results(sweep)
    rows = list(csv.DictReader((sweep.directory / "results.csv").open()))
    assert [(r["run"], r["model.beta"], r["status"]) for r in rows] == [
        ("model.beta=0.05", "0.05", "done"), ("base", "0.1", "done"), ("model.beta=0.2", "0.2", "failed")]
    assert float(rows[0]["final_val_loss"]) == pytest.approx(0.51) and float(rows[0]["best_val_loss"]) == pytest.approx(0.51)
    assert float(rows[1]["hit@1"]) == pytest.approx(0.75) and float(rows[1]["hit@1_ci_low"]) < 0.75
    assert rows[1]["flags"] == "OscillationDetector:action" and rows[0]["flags"] == "none"
    assert rows[0]["peak_memory_gb"] == "1.5" and rows[0]["wall_s"] == "12.5"
    assert rows[2]["error"] == "model.beta must be > 0"
    assert "Best run by `hit@1` (higher is better): **base**" in text and "McNemar p" in text
    plots = sorted((sweep.directory / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["loss_curves_model.beta.png", "metrics_vs_model.beta.png"]
    assert all(p.read_bytes()[:8] == PNG for p in plots)
    text = write_results(sweep, best_by="best_val_loss")
    assert "**model.beta=0.05**" in text and "no confidence interval" in text


def test_noise_note_when_cis_overlap(tmp_path):
    sweep = planned(tmp_path, "--grid", "model.beta=0.05,0.2")
    fake_run(sweep, sweep.runs[0], [0.7, 0.6], [1, 0, 0, 1, 0, 1, 1, 0])
    fake_run(sweep, sweep.runs[1], [0.7, 0.6], [1, 0, 0, 1, 0, 1, 0, 0])
    assert "within noise" in write_results(sweep)


# ------------------------------------------------------------------------------ real sweeps (slow)
KILLER = textwrap.dedent('''
    import os
    from pathlib import Path
    import lightning as L

    class ExitOnce(L.Callback):
        """Kills the process (no clean-up, like a lost machine) at step 2 of the first run that gets there."""
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            marker = Path(os.environ["SWEEP_TEST_MARKER"])
            if trainer.global_step >= 2 and not marker.exists():
                marker.write_text("killed")
                os._exit(1)
''')


def tiny_sweep(tmp_path: Path, model_dir: str, *argv: str, fit=()) -> list[str]:
    return ["sweep", "--config", str(REPO / "configs" / "quick_experiment.yaml"), *argv, "--test", "off", "--",
            f"--model.model_name_or_path={model_dir}", "--data.synthetic_num_pairs=16", "--data.val_fraction=0.25",
            "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--checkpoint.every_n_train_steps=1", "--diagnosis.print_report=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}", *fit]


@pytest.mark.slow
def test_sweep_two_betas_skips_resumes_and_records_failures(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SWEEP_TEST_MARKER", str(tmp_path / "killed"))
    argv = tiny_sweep(tmp_path, tiny_model_dir, "--grid", "model.beta=0,0.05,0.2", "--name", "betas",
                      fit=["--trainer.callbacks+=killer.ExitOnce"])
    assert sweep_module.main(argv) == 1  # beta=0 fails, beta=0.05 is killed at step 2, beta=0.2 finishes
    sweep = plan_sweep(*parse_args(argv))
    failed, killed, finished = sweep.runs
    assert load_record(sweep, failed)["status"] == "failed" and "model.beta must be > 0" in load_record(sweep, failed)["error"]
    assert load_record(sweep, killed)["status"] == "failed" and (run_dir(sweep, killed) / "checkpoints" / "last.ckpt").is_file()
    assert load_record(sweep, finished)["status"] == "done"

    capsys.readouterr()
    assert sweep_module.main(argv) == 1  # beta=0 still fails; beta=0.05 resumes; beta=0.2 is skipped
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 1 and "resuming from" in out
    record = load_record(sweep, killed)
    assert record["status"] == "done" and record["attempts"] == 2 and record["resumed_from"].endswith("last.ckpt")
    ending = json.loads((run_dir(sweep, killed) / "diagnosis.json").read_text())["ending"]
    assert ending.startswith("Finished after 2 of 2 epoch(s), 6 optimizer steps")

    rows = {r["run"]: r for r in csv.DictReader((sweep.directory / "results.csv").open())}
    assert rows["model.beta=0.05"]["model.beta"] == "0.05" and rows["model.beta=0.2"]["model.beta"] == "0.2"
    assert rows["model.beta=0"]["status"] == "failed" and "model.beta" in rows["model.beta=0"]["error"]
    for name in ("model.beta=0.05", "model.beta=0.2"):
        assert float(rows[name]["final_val_loss"]) > 0 and rows[name]["val_reward_accuracy"] != ""
        assert float(rows[name]["wall_s"]) > 0 and float(rows[name]["peak_memory_gb"]) > 0
    assert all(p.read_bytes()[:8] == PNG for p in (sweep.directory / "plots").glob("*.png"))
    assert len(list((sweep.directory / "plots").glob("*.png"))) == 2

    capsys.readouterr()
    assert sweep_module.main(argv) == 1  # the same command again: only beta=0 is tried (and fails) again
    assert capsys.readouterr().out.count("done before, skipped") == 2


@pytest.mark.slow
def test_epoch_reuse_with_constant_schedule_equals_training(tmp_path, tiny_model_dir):
    fit = ["--model.lr_scheduler_type=constant_with_warmup", "--model.learning_rate=5e-3"]
    grid = ("--grid", "trainer.max_epochs=1,2")
    reuse = [a for a in tiny_sweep(tmp_path, tiny_model_dir, *grid, "--name", "reuse", fit=fit) if a != "--trainer.max_epochs=2"]
    trained = [a for a in tiny_sweep(tmp_path, tiny_model_dir, *grid, "--name", "trained", "--epoch-reuse", "off", fit=fit)
               if a != "--trainer.max_epochs=2"]
    assert sweep_module.main(reuse) == 0 and sweep_module.main(trained) == 0
    reused_sweep, trained_sweep = plan_sweep(*parse_args(reuse)), plan_sweep(*parse_args(trained))
    one_epoch = run_dir(reused_sweep, reused_sweep.runs[0])
    note = json.loads((one_epoch / "reused_checkpoint.json").read_text())
    assert note["exact"] and note["epoch"] == 1
    assert not (run_dir(trained_sweep, trained_sweep.runs[0]) / "reused_checkpoint.json").exists()
    weights = [torch.load(run_dir(s, s.runs[0]) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for s in (reused_sweep, trained_sweep)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = [next(csv.DictReader((s.directory / "results.csv").open())) for s in (reused_sweep, trained_sweep)]
    assert rows[0]["final_val_loss"] == rows[1]["final_val_loss"]
    assert "exact" in rows[0]["source"] and rows[1]["source"] == "trained"


# ------------------------------------------------------------------- the seams in fit that sweep uses
def test_constant_schedule_holds_the_peak_after_warmup():
    from lit_dpo.module import linear_warmup_then_constant, linear_warmup_then_decay

    assert [linear_warmup_then_constant(s, warmup_steps=2) for s in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert linear_warmup_then_constant(0, warmup_steps=0) == 1.0
    assert linear_warmup_then_decay(3, warmup_steps=2, total_steps=4) == 0.5  # the default depends on the total


def test_fit_with_epoch_checkpoints_writes_them_and_diagnosis_json(tmp_path, tiny_model_dir):
    from test_training import run_cli, write_pairs

    write_pairs(tmp_path / "pairs.jsonl")
    run_cli(tmp_path, tiny_model_dir, "--trainer.max_epochs=2", "--trainer.callbacks+=lit_dpo.callbacks.EpochCheckpoints",
            "--diagnosis.print_report=false")
    run = tmp_path / "tb_logs" / "run" / "version_0"
    steps = json.loads((run / "checkpoints" / "epochs.json").read_text())
    assert steps == {"1": 12, "2": 24} and (run / "checkpoints" / "epoch1.ckpt").is_file()
    assert torch.load(run / "checkpoints" / "epoch1.ckpt", weights_only=False)["global_step"] == 12
    diagnosis = json.loads((run / "diagnosis.json").read_text())
    assert diagnosis["ending"].startswith("Finished after 2 of 2 epoch(s)") and not diagnosis["crashed"]
    assert {"source", "kind", "rule", "message"} <= set(diagnosis["findings"][0]) and diagnosis["peak_memory_gb"] > 0
