"""CI smoke test of benchmarks/bench_vs_trl.py: `--quick` runs end to end and both trainers agree.

A smoke test of the script (tiny random model, 8 pairs, 1 epoch), not a timing test: the script
itself exits non-zero when lit_dpo's step-1 loss differs from TRL's by more than 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_losses_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_vs_trl.py"), "--quick", "--threads", "1",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["summary"]["contenders"]
    assert set(rows) == {"trl", "lit_dpo"}
    assert rows["lit_dpo"]["step1_loss_diff"] <= 1e-4
    assert rows["lit_dpo"]["steps"] == rows["trl"]["steps"] == 4  # 8 pairs, batch 2, 1 epoch
    assert [r["contender"] for r in results["runs"]] == ["trl", "lit_dpo"]  # alternating, TRL first
    assert all(r["peak_rss_bytes"] > 0 for r in results["runs"])
    assert results["data"]["tokenization_mismatches"] == 0
    assert "QUICK SMOKE TEST" in (tmp_path / "results.md").read_text()


def test_one_sided_override_of_a_shared_setting_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_vs_trl.py"), "--quick", "--lit-arg", "data.batch_size=4",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--lit-arg data.batch_size=4" in proc.stderr and "--batch-size" in proc.stderr
