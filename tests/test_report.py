"""Tests for lit_dpo.report: bootstrap CIs, McNemar on hand-worked examples, and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lit_dpo.errors import UserInputError
from lit_dpo.commands import main
from lit_dpo.rec.report import build_report
from lit_dpo.rec.stats import bootstrap_ci, mcnemar


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(1).random(200)
    mean, low, high = bootstrap_ci(values)
    assert low <= mean <= high
    assert mean == pytest.approx(values.mean())
    assert bootstrap_ci(values) == (mean, low, high)


def test_bootstrap_ci_narrows_with_more_samples():
    rng = np.random.default_rng(2)
    _, lo_small, hi_small = bootstrap_ci(rng.integers(0, 2, 50))
    _, lo_big, hi_big = bootstrap_ci(rng.integers(0, 2, 5000))
    assert hi_big - lo_big < (hi_small - lo_small) / 3


def test_bootstrap_ci_rejects_empty():
    with pytest.raises(UserInputError):
        bootstrap_ci([])


def test_mcnemar_exact_hand_example():
    """b=8, c=2: p = 2 * P(X <= 2 | n=10, 1/2) = 2 * (1 + 10 + 45) / 1024 = 0.109375."""
    a = [1] * 8 + [0] * 2 + [1] * 5
    b = [0] * 8 + [1] * 2 + [1] * 5
    res = mcnemar(a, b)
    assert (res["b"], res["c"]) == (8, 2)
    assert res["exact"]
    assert res["p_value"] == pytest.approx(0.109375)


def test_mcnemar_identical_gives_p_one():
    hits = [1, 0, 1, 1, 0]
    res = mcnemar(hits, hits)
    assert (res["b"], res["c"], res["p_value"]) == (0, 0, 1.0)


def test_mcnemar_chi_square_branch():
    """b=30, c=10: chi2 = (|30-10| - 1)^2 / 40 = 9.025; p = erfc(sqrt(9.025/2)) ≈ 0.002663."""
    a = [1] * 30 + [0] * 10
    b = [0] * 30 + [1] * 10
    res = mcnemar(a, b)
    assert not res["exact"]
    assert res["statistic"] == pytest.approx(9.025)
    assert res["p_value"] == pytest.approx(0.0026636, rel=1e-3)


def test_mcnemar_mismatched_ids_or_lengths():
    with pytest.raises(UserInputError, match="prompt_ids"):
        mcnemar([1, 0], [1, 0], ["p1", "p2"], ["p2", "p1"])
    with pytest.raises(UserInputError):
        mcnemar([1, 0], [1])


def _write_run(run_dir: Path, name: str, hits: list[int], ids: list[str], loss_type: str | None = None) -> Path:
    run_dir.mkdir(parents=True)
    ndcg = [0.5 * h + 0.1 for h in hits]
    results = {
        "run": name,
        "metrics": {"hit@1": float(np.mean(hits)), "ndcg@10": float(np.mean(ndcg))},
        "per_prompt": {"prompt_ids": ids, "hit@1": hits, "ndcg@10": ndcg},
    }
    if loss_type is not None:
        results["loss_type"] = loss_type
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "config.yaml").write_text(
        "model:\n  class_path: lit_dpo.module.DPOModule\n  init_args:\n"
        f"    loss_type: {loss_type or 'sigmoid'}\n    beta: 0.1\n    learning_rate: 5.0e-05\n"
        "trainer:\n  max_epochs: 3\n"
    )
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    ids = [f"p{i}" for i in range(40)]
    dpo = [1] * 20 + [1] * 8 + [0] * 12
    sft = [1] * 20 + [0] * 8 + [0] * 12
    return [
        _write_run(tmp_path / "dpo" / "version_0", "dpo", dpo, ids),
        _write_run(tmp_path / "sft" / "version_0", "sft", sft, ids, loss_type="sft"),
    ]


def test_report_two_runs(two_runs, tmp_path):
    out = tmp_path / "out"
    md = build_report(two_runs, out)
    assert "| dpo | sigmoid | 0.1 | 5e-05 | 3 | 0.700 [" in md  # hparams from config.yaml
    assert "| sft | sft | 0.1 | 5e-05 | 3 | 0.500 [" in md  # results.json wins over config.yaml
    assert "b = 8" in md and "c = 0" in md
    # Exact: 2 * 0.5**8 = 0.0078125 < 0.05, and dpo has the 8 discordant wins.
    assert "p = 0.007812" in md
    assert "significant at α = 0.05: **dpo** beats sft" in md
    assert (out / "report.md").read_text() == md
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")


def test_report_not_significant_is_honest(tmp_path):
    ids = [f"p{i}" for i in range(10)]
    a = [1, 1, 1, 0, 0, 1, 0, 1, 0, 0]
    b = [1, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    runs = [_write_run(tmp_path / "a", "a", a, ids), _write_run(tmp_path / "b", "b", b, ids)]
    md = build_report(runs)
    assert "not significant" in md and "may be noise" in md
    assert "rigour over hoping" in md
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")  # default: first run's parent


def test_report_mismatched_prompt_ids(tmp_path):
    a = _write_run(tmp_path / "a", "a", [1, 0, 1], ["p1", "p2", "p3"])
    b = _write_run(tmp_path / "b", "b", [1, 0, 1], ["p1", "p2", "p4"])
    with pytest.raises(UserInputError, match="prompt_ids"):
        build_report([a, b], tmp_path / "out")


def test_report_missing_results(tmp_path):
    run_dir = tmp_path / "empty_run"
    run_dir.mkdir()
    with pytest.raises(UserInputError, match="python -m lit_dpo test") as exc:
        build_report([run_dir])
    assert str(run_dir) in str(exc.value)


def test_main_prints_report_and_returns_zero(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "o")]) == 0
    assert "McNemar" in capsys.readouterr().out


def test_main_returns_two_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json" in err


def test_python_m_lit_dpo_report_dispatches(tmp_path, monkeypatch, capsys):
    import sys

    from lit_dpo.__main__ import main as package_main

    monkeypatch.setattr(sys, "argv", ["lit_dpo", "report", str(tmp_path / "no-run")])
    with pytest.raises(SystemExit) as exit_info:
        package_main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("lit_dpo: error:")
