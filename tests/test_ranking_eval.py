"""Ranking metrics inside fit (validation) and test (results.json beside the run) through the real CLI."""

from __future__ import annotations

import json

from lit_dpo.data.synthetic import generate_pairs
from lit_dpo.files import write_jsonl
from lit_dpo.rec.results import load_run
from tests.test_training import run_cli, write_pairs

FAST = ("--trainer.max_epochs=1", "--data.batch_size=2", "--ranking.max_new_tokens=4")


def test_fit_logs_val_ranking_and_test_writes_results_beside_the_run(tiny_model_dir, tmp_path):
    write_jsonl(generate_pairs(12, seed=3, history_len=2, num_candidates=4), tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, *FAST)
    assert {"val/hit@1", "val/ndcg@5", "val/mrr"} <= set(cli.trainer.callback_metrics)
    run_dir = tmp_path / "tb_logs" / "run" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"

    test = run_cli(tmp_path, tiny_model_dir, *FAST, f"--ckpt_path={last}", subcommand="test")
    assert test.trainer.log_dir == str(run_dir)  # no new version_1: results sit beside the training curves
    assert not (tmp_path / "tb_logs" / "run" / "version_1").exists()
    payload = json.loads((run_dir / "results.json").read_text())
    metrics = payload["metrics"]
    for name in ("hit@1", "ndcg@5_sum", "mrr_sum", "hr@1_mean", "valid_ratio", "hr@1_all", "random_hr@1",
                 "popular_hr@1", "preference_accuracy", "reward_margin", "pair_loss"):
        assert name in metrics, name
    assert metrics["random_hr@1"] == 0.25  # 4 candidates
    assert len(payload["per_prompt"]["hit@1"]) == 3  # the 25% validation split doubles as the test set
    assert payload["loss_type"] == "sigmoid" and payload["epochs"] == 1
    assert (run_dir / "results.md").is_file() and (run_dir / "config_test.yaml").is_file()
    assert "test/hit@1" in test.trainer.callback_metrics
    run = load_run(run_dir)  # what `python -m lit_dpo report` reads
    assert run.metrics["hit@1"] == metrics["hit@1"]


def test_data_without_candidates_skips_ranking(tiny_model_dir, tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, *FAST)
    assert "val/hit@1" not in cli.trainer.callback_metrics
    last = tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    run_cli(tmp_path, tiny_model_dir, *FAST, f"--ckpt_path={last}", subcommand="test")
    assert not (last.parent.parent / "results.json").exists()
