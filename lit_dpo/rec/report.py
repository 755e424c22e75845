"""The DPO-vs-SFT comparison report: bootstrap CIs per metric and a McNemar test on HR@1.

The thesis question is whether DPO beats SFT on ranking adherence, so a single number per run is
not enough: two runs evaluated on a few hundred prompts differ by noise alone. This module reads
what the evaluator wrote into each run directory and turns it into a Markdown table with
percentile-bootstrap confidence intervals, a paired McNemar test on HR@1 when exactly two runs
share a test set, and a grouped bar chart. It loads no model and imports no torch.

`results.json` is described in `lit_dpo.rec.results`; the statistics are `lit_dpo.rec.stats`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lit_dpo.errors import UserInputError
from lit_dpo.files import write_text
from lit_dpo.rec.results import HIT_KEY, RunResults, load_run
from lit_dpo.rec.stats import ALPHA, bootstrap_ci, mcnemar


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
    write_text(out_dir / "report.md", markdown)
    return markdown
