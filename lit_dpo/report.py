"""The DPO-vs-SFT comparison report: bootstrap CIs per metric and a McNemar test on HR@1.

The thesis question is whether DPO beats SFT on ranking adherence, so a single number per run is
not enough: two runs evaluated on a few hundred prompts differ by noise alone. This module reads
what the evaluator wrote into each run directory and turns it into a Markdown table with
percentile-bootstrap confidence intervals, a paired McNemar test on HR@1 when exactly two runs
share a test set, and a grouped bar chart. It loads no model and imports no torch.

`results.json` schema (written by `python -m lit_dpo test` into the run directory, e.g.
`tb_logs/balanced/version_0/results.json`)::

    {
      "run": "balanced",                 # display name
      "loss_type": "sigmoid",            # "sft" for the SFT baseline
      "beta": 0.1,
      "learning_rate": 5e-5,
      "epochs": 3,
      "metrics": {"hit@1": 0.41, "ndcg@10": 0.55, ...},    # aggregate value per metric
      "per_prompt": {
        "prompt_ids": ["u12_3", ...],    # test-prompt ids, same order as every list below
        "hit@1": [1, 0, ...],            # 0/1 per test prompt (needed for McNemar)
        "ndcg@10": [0.63, 0.0, ...]      # any other per-prompt metric list -> bootstrap CI
      }
    }

Hyperparameters missing from `results.json` are taken from the run's `config.yaml` (as written by
LightningCLI): `model.loss_type`, `model.beta`, `model.learning_rate`, `trainer.max_epochs`
(also under `model.init_args` when the model is given as `class_path/init_args`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lit_dpo.errors import UserInputError

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
HIT_KEY = "hit@1"
# Below this many discordant pairs the chi-square approximation is poor; use the exact binomial.
EXACT_THRESHOLD = 25
ALPHA = 0.05


@dataclass
class RunResults:
    """One run's evaluation output, i.e. a parsed `results.json` (see the module docstring).

    Attributes:
        run: Display name of the run.
        loss_type: Preference loss (`"sft"` for the baseline); None when unknown.
        beta: DPO KL strength; None when unknown or not applicable.
        learning_rate: Peak learning rate; None when unknown.
        epochs: Training epochs (`trainer.max_epochs`); None when unknown.
        metrics: Aggregate value per metric name.
        per_prompt: Per-prompt lists keyed by metric name, plus optional `prompt_ids`.
        path: The run directory it was read from.
    """

    run: str
    loss_type: str | None = None
    beta: float | None = None
    learning_rate: float | None = None
    epochs: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    per_prompt: dict[str, list[Any]] = field(default_factory=dict)
    path: Path | None = None


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of the mean.

    Args:
        values: Per-prompt metric values (e.g. 0/1 hits or NDCG in [0, 1]).
        n_resamples: Bootstrap resamples; 2000 keeps the interval ends stable to ~0.005.
        confidence: Two-sided coverage, e.g. 0.95.
        seed: RNG seed, so the same inputs always give the same interval.

    Returns:
        `(mean, low, high)` of the sample mean.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise UserInputError("bootstrap_ci: no values; the per-prompt metric list is empty")
    if not 0.0 < confidence < 1.0:
        raise UserInputError(f"bootstrap_ci: confidence={confidence} must be in (0, 1), e.g. 0.95")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_resamples, arr.size))
    means = arr[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(arr.mean()), float(low), float(high)


def _exact_binomial_two_sided(b: int, c: int) -> float:
    """Exact two-sided sign test p-value: P(X <= min(b, c)) * 2 under Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def mcnemar(
    hits_a: Sequence[int],
    hits_b: Sequence[int],
    ids_a: Sequence[Any] | None = None,
    ids_b: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Paired McNemar test between two runs' per-prompt 0/1 hits on the same test prompts.

    Exact binomial (two-sided) when the discordant count b + c < 25, else chi-square with 1 dof
    and Edwards' continuity correction, `(|b - c| - 1)^2 / (b + c)`.

    Args:
        hits_a: 0/1 per prompt for run A.
        hits_b: 0/1 per prompt for run B, same prompts in the same order.
        ids_a: Optional prompt ids for run A; when both are given they must be equal.
        ids_b: Optional prompt ids for run B.

    Returns:
        Dict with `b` (A right, B wrong), `c` (A wrong, B right), `statistic`, `p_value`, `exact`.

    Raises:
        UserInputError: Lengths or prompt ids differ, or a hit is not 0/1.
    """
    if ids_a is not None and ids_b is not None and list(ids_a) != list(ids_b):
        raise UserInputError(
            "mcnemar: per_prompt.prompt_ids differ between the two runs; evaluate both on the same test set"
        )
    if len(hits_a) != len(hits_b):
        raise UserInputError(
            f"mcnemar: {len(hits_a)} vs {len(hits_b)} per-prompt hits; evaluate both runs on the same test set"
        )
    bad = [h for h in list(hits_a) + list(hits_b) if h not in (0, 1, True, False)]
    if bad:
        raise UserInputError(f"mcnemar: per_prompt.{HIT_KEY} must hold 0/1 values, got {bad[0]!r}")
    b = sum(1 for x, y in zip(hits_a, hits_b) if x and not y)
    c = sum(1 for x, y in zip(hits_a, hits_b) if y and not x)
    if b + c < EXACT_THRESHOLD:
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": _exact_binomial_two_sided(b, c), "exact": True}
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    # Survival function of chi-square with 1 dof: P(X > s) = erfc(sqrt(s / 2)).
    return {"b": b, "c": c, "statistic": float(stat), "p_value": math.erfc(math.sqrt(stat / 2.0)), "exact": False}


def _read_config(run_dir: Path) -> dict[str, Any]:
    """Hyperparameters from the run's LightningCLI `config.yaml`; empty when absent."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    import yaml  # only needed when a config is present

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix or delete it") from exc
    model = cfg.get("model") or {}
    model_args = {**model, **(model.get("init_args") or {})} if isinstance(model, dict) else {}
    trainer = cfg.get("trainer") or {}
    return {
        "loss_type": model_args.get("loss_type"),
        "beta": model_args.get("beta"),
        "learning_rate": model_args.get("learning_rate"),
        "epochs": trainer.get("max_epochs") if isinstance(trainer, dict) else None,
    }


def load_run(run_dir: Path) -> RunResults:
    """Parse `results.json` in a run directory, filling missing hyperparameters from `config.yaml`.

    Raises:
        UserInputError: `results.json` is missing or malformed.
    """
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise UserInputError(
            f"{run_dir}: no {RESULTS_FILE}; run `python -m lit_dpo test` for this run first"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: invalid JSON ({exc.msg}); rerun `python -m lit_dpo test`") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("metrics"), dict):
        raise UserInputError(f"{path}: missing the `metrics` object; rerun `python -m lit_dpo test`")
    cfg = _read_config(run_dir)
    pick = lambda key: raw.get(key) if raw.get(key) is not None else cfg.get(key)  # noqa: E731
    return RunResults(
        run=str(raw.get("run") or run_dir.name),
        loss_type=pick("loss_type"),
        beta=pick("beta"),
        learning_rate=pick("learning_rate"),
        epochs=pick("epochs"),
        metrics={k: float(v) for k, v in raw["metrics"].items()},
        per_prompt=dict(raw.get("per_prompt") or {}),
        path=run_dir,
    )


def _metric_cell(run: RunResults, name: str) -> tuple[str, tuple[float, float, float] | None]:
    """Table cell `0.412 [0.38, 0.44]` and the CI (None when no per-prompt list exists)."""
    values = run.per_prompt.get(name)
    if values:
        # The point is the per-prompt mean, not `metrics[name]`, so it always lies inside its own CI
        # (an aggregate such as LLaRA's correct/valid HR@1 has a different denominator).
        mean, low, high = bootstrap_ci(values)
        return f"{mean:.3f} [{low:.2f}, {high:.2f}]", (mean, low, high)
    if name in run.metrics:
        return f"{run.metrics[name]:.3f}", None
    return "–", None


def _fmt(value: Any) -> str:
    """Hyperparameter cell; `–` when unknown."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _mcnemar_section(a: RunResults, b: RunResults) -> list[str]:
    """McNemar line on HR@1 plus an honest reading of it."""
    if HIT_KEY not in a.per_prompt or HIT_KEY not in b.per_prompt:
        return [f"McNemar on HR@1 skipped: `per_prompt.{HIT_KEY}` is missing from one of the runs."]
    res = mcnemar(a.per_prompt[HIT_KEY], b.per_prompt[HIT_KEY], a.per_prompt.get("prompt_ids"), b.per_prompt.get("prompt_ids"))
    test = "exact binomial" if res["exact"] else "χ² with continuity correction"
    lines = [
        f"**McNemar on HR@1** ({test}): {a.run} right / {b.run} wrong b = {res['b']}, "
        f"{a.run} wrong / {b.run} right c = {res['c']}, p = {res['p_value']:.4g}.",
        "",
    ]
    if res["p_value"] < ALPHA and res["b"] != res["c"]:
        better, worse = (a, b) if res["b"] > res["c"] else (b, a)
        lines.append(f"The difference is significant at α = {ALPHA}: **{better.run}** beats {worse.run} on HR@1.")
    else:
        lines.append(
            f"The difference is not significant at α = {ALPHA}: on this test set it may be noise, and neither "
            "run can be called better on HR@1. As the guide says, \"either result is publishable — rigour over hoping\"."
        )
    return lines


def _plot(runs: list[RunResults], names: list[str], cis: dict[tuple[int, str], tuple[float, float, float] | None], path: Path) -> None:
    """Grouped bar chart: one group per metric, one bar per run, CI error bars where known."""
    import matplotlib

    matplotlib.use("Agg")  # headless: report runs on servers without a display
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(names) * max(1, len(runs) / 2)), 3.5))
    for i, run in enumerate(runs):
        heights, err = [], [[], []]
        for name in names:
            ci = cis.get((i, name))
            h = ci[0] if ci else run.metrics.get(name, float("nan"))
            heights.append(h)
            err[0].append(max(0.0, h - ci[1]) if ci else 0.0)
            err[1].append(max(0.0, ci[2] - h) if ci else 0.0)
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, yerr=err, capsize=3, label=run.run)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel("score (95% bootstrap CI)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def build_report(run_dirs: list[Path], out_dir: Path | None = None) -> str:
    """Write `report.md` and `report.png` comparing runs and return the Markdown.

    Args:
        run_dirs: Run directories, each holding `results.json` (and optionally `config.yaml`).
        out_dir: Where to write the report; defaults to the first run directory's parent.

    Returns:
        The Markdown report.

    Raises:
        UserInputError: No run given, a `results.json` is missing/malformed, or two runs differ in prompts.
    """
    if not run_dirs:
        raise UserInputError("report: give at least one run directory, e.g. tb_logs/balanced/version_0")
    runs = [load_run(Path(d)) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dirs[0]).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    names: list[str] = []
    for run in runs:
        names += [n for n in run.metrics if n not in names]
    header = ["run", "loss type", "beta", "lr", "epochs", *names]
    lines = ["# DPO vs SFT comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cis: dict[tuple[int, str], tuple[float, float, float] | None] = {}
    for i, run in enumerate(runs):
        cells = []
        for name in names:
            cell, cis[(i, name)] = _metric_cell(run, name)
            cells.append(cell)
        row = [run.run, _fmt(run.loss_type), _fmt(run.beta), _fmt(run.learning_rate), _fmt(run.epochs), *cells]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Intervals are 95% percentile-bootstrap CIs over test prompts (2000 resamples, seed 0)."]
    if len(runs) == 2:
        lines += [""] + _mcnemar_section(*runs)
    lines += ["", "![metrics per run](report.png)", ""]
    markdown = "\n".join(lines)
    _plot(runs, names, cis, out_dir / "report.png")
    (out_dir / "report.md").write_text(markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    """`report RUN_DIR [RUN_DIR ...] [--out DIR]`: print the Markdown report; 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m lit_dpo report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: first run's parent)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # accept the subcommand name as `python -m lit_dpo` passes it through
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        print(build_report(args.run_dirs, args.out))
    except UserInputError as exc:
        print(f"lit_dpo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
