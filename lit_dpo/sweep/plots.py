"""A sweep's PNG plots: per swept key, the loss curves of its runs overlaid, and each metric against
the key's value (HR@1 / NDCG with their bootstrap CIs as error bars). Matplotlib's Agg backend: no
display needed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lit_dpo.sweep.plan import Sweep

CURVES = (("train/loss", "train loss (per optimizer step)"), ("val/loss", "val loss"))
METRICS = (("final_val_loss", "final val loss"), ("best_val_loss", "best val loss"),
           ("val_reward_accuracy", "val reward accuracy"), ("val_reward_margin", "val reward margin"),
           ("val_hit@1", "HR@1 (val, last)"), ("hit@1", "HR@1 (test)"), ("ndcg@10", "NDCG@10 (test)"))


def runs_of_key(sweep: Sweep, key: str) -> list:
    """The runs that show `key`'s effect: in one-at-a-time mode those varying only `key` (and the base)."""
    if sweep.product:
        return list(sweep.runs)
    return [run for run in sweep.runs if set(run.overrides) <= {key}]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(key: str) -> str:
    return re.sub(r"[^\w.]+", "_", key)


def plot_loss_curves(sweep: Sweep, scalars: dict[str, dict[str, list[tuple[int, float]]]]) -> list[Path]:
    """`plots/loss_curves_<key>.png` per swept key: train and val loss of its runs, one line per run."""
    plt = _pyplot()
    paths = []
    for key in sweep.keys:
        runs = sorted(runs_of_key(sweep, key), key=lambda r: _sort_key(r.values[key]))
        fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4), squeeze=False)
        for ax, (tag, title) in zip(axes[0], CURVES):
            for run in runs:
                points = scalars.get(run.run_id, {}).get(tag, [])
                if points:
                    label = run.run_id if sweep.product else f"{key.split('.')[-1]}={run.values[key]}"
                    ax.plot([s for s, _ in points], [v for _, v in points], marker="o" if tag == "val/loss" else None,
                            markersize=3, label=label)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{sweep.name}: loss curves by {key}")
        fig.tight_layout()
        paths.append(_save(fig, sweep.directory / "plots" / f"loss_curves_{_slug(key)}.png"))
        plt.close(fig)
    return paths


def plot_metrics(sweep: Sweep, rows: list[dict[str, Any]]) -> list[Path]:
    """`plots/metrics_vs_<key>.png` per swept key: one panel per metric that any finished run has."""
    plt = _pyplot()
    paths = []
    for key in sweep.keys:
        ids = {run.run_id for run in runs_of_key(sweep, key)}
        mine = [r for r in rows if r["run"] in ids and r["status"] == "done"]
        metrics = [(m, t) for m, t in METRICS if any(_finite(r.get(m)) for r in mine)]
        if not metrics:
            continue
        numeric = all(_finite(r[key]) for r in mine)
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
        for ax, (metric, title) in zip(axes[0], metrics):
            points = sorted(((r[key], r[metric], r) for r in mine if _finite(r.get(metric))), key=lambda p: _sort_key(p[0]))
            xs = [p[0] if numeric else str(p[0]) for p in points]
            ys = [p[1] for p in points]
            low = [p[1] - p[2].get(f"{metric}_ci_low", p[1]) for p in points]
            high = [p[2].get(f"{metric}_ci_high", p[1]) - p[1] for p in points]
            ax.errorbar(xs, ys, yerr=[low, high] if any(low) or any(high) else None, marker="o", capsize=3,
                        linestyle="-" if not sweep.product else "none")
            if numeric and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")  # learning rates: 1e-5 ... 1e-4
            ax.set_title(title)
            ax.set_xlabel(key)
        fig.suptitle(f"{sweep.name}: metrics by {key}" + (" (all runs of the product)" if sweep.product else ""))
        fig.tight_layout()
        paths.append(_save(fig, sweep.directory / "plots" / f"metrics_vs_{_slug(key)}.png"))
        plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if _finite(value) else (1, 0, str(value))
