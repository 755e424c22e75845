"""A sweep's results: `results.csv`, `results.md` and PNG plots in the sweep directory.

One row per run: the swept values, final and best val loss, reward accuracy and margin and the
validation HR@1 (from the run's TensorBoard scalars), test HR@1 / NDCG@10 with bootstrap CIs when `test` wrote `results.json`, the
watchers' flags (`diagnosis.json`), wall time and peak memory. The best run by the chosen metric is
named; when the CIs of the best and the runner-up overlap (or McNemar on HR@1 finds no difference)
the note says the difference is within noise.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from lit_dpo.files import atomic_path, write_text
from lit_dpo.rec.results import HIT_KEY, RESULTS_FILE
from lit_dpo.rec.stats import ALPHA, bootstrap_ci, mcnemar
from lit_dpo.sweep.plan import Sweep, SweepInputError
from lit_dpo.sweep.plots import plot_loss_curves, plot_metrics
from lit_dpo.sweep.runs import REUSE_FILE, load_record, run_dir

METRIC_COLUMNS = ["final_val_loss", "best_val_loss", "val_reward_accuracy", "val_reward_margin", "val_hit@1",
                  HIT_KEY, f"{HIT_KEY}_ci_low", f"{HIT_KEY}_ci_high", "ndcg@10", "ndcg@10_ci_low", "ndcg@10_ci_high"]
INFO_COLUMNS = ["flags", "wall_s", "peak_memory_gb", "source", "error"]
LOWER_IS_BETTER = ("final_val_loss", "best_val_loss")


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of one run directory: tag → [(step, value)], in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not directory.is_dir():
        return {}
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run may log a step twice: keep the last
        out[tag] = sorted(by_step.items())
    return out


def collect_row(sweep: Sweep, run, scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """One results row for `run` (see the module docstring for the columns)."""
    directory, record = run_dir(sweep, run), load_record(sweep, run)
    row: dict[str, Any] = {"run": run.run_id, "version": run.version, "status": record["status"], **run.values}
    val_loss = [v for _, v in scalars.get("val/loss", [])]
    row["final_val_loss"] = val_loss[-1] if val_loss else None
    row["best_val_loss"] = min(val_loss) if val_loss else None
    for column, tag in (("val_reward_accuracy", "val/rewards/accuracies"), ("val_reward_margin", "val/rewards/margins"),
                        ("val_hit@1", "val/hit@1")):
        row[column] = scalars[tag][-1][1] if scalars.get(tag) else None
    row.update(test_metrics(directory / RESULTS_FILE))
    reuse = json.loads((directory / REUSE_FILE).read_text()) if (directory / REUSE_FILE).is_file() else None
    diagnosis_file = directory / ("source_diagnosis.json" if reuse else "diagnosis.json")
    diagnosis = json.loads(diagnosis_file.read_text()) if diagnosis_file.is_file() else {}
    fired = [f"{f['source']}:{f['kind']}" for f in diagnosis.get("findings", []) if f["kind"] != "ok"]
    row["flags"] = "n/a (reused checkpoint)" if reuse else ("; ".join(dict.fromkeys(fired)) or ("none" if diagnosis else ""))
    row["wall_s"] = record.get("wall_s")
    row["peak_memory_gb"] = round(diagnosis["peak_memory_gb"], 3) if "peak_memory_gb" in diagnosis else None
    if reuse:
        kind = "exact" if reuse["exact"] else "approximate"
        row["source"] = f"epoch {reuse['epoch']} of {reuse['source_run']} (version_{reuse['source_version']}, {kind})"
    else:
        row["source"] = "trained"
    row["error"] = record.get("error") or ""
    return row


def test_metrics(path: Path) -> dict[str, Any]:
    """HR@1 and NDCG@10 with 95% bootstrap CIs from a run's results.json; empty when there is none."""
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())
    out: dict[str, Any] = {}
    per_prompt = results.get("per_prompt", {})
    for metric, key in ((HIT_KEY, HIT_KEY), ("ndcg@10", "ndcg@10_sum")):  # lit_dpo.rec.scoring's names
        if per_prompt.get(key):
            mean, low, high = bootstrap_ci(per_prompt[key])
            out.update({metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        elif key in results.get("metrics", {}):
            out[metric] = results["metrics"][key]
    out["_per_prompt"] = per_prompt
    return out


def best_run(rows: list[dict[str, Any]], metric: str) -> tuple[dict[str, Any] | None, str]:
    """The best finished run by `metric` and a sentence about it (noise note included)."""
    done = [r for r in rows if r["status"] == "done" and _number(r.get(metric)) is not None]
    if not done:
        return None, f"No finished run has `{metric}`; no best run named."
    lower = metric in LOWER_IS_BETTER
    ranked = sorted(done, key=lambda r: r[metric], reverse=not lower)
    best = ranked[0]
    text = f"Best run by `{metric}` ({'lower' if lower else 'higher'} is better): **{best['run']}** ({best[metric]:.4f})."
    if len(ranked) == 1:
        return best, text
    second = ranked[1]
    low, high = best.get(f"{metric}_ci_low"), best.get(f"{metric}_ci_high")
    if low is None or second.get(f"{metric}_ci_low") is None:
        return best, text + (f" Runner-up {second['run']} ({second[metric]:.4f}); no confidence interval for this "
                             "metric (CIs come from `test`'s per-prompt results), so judge the gap with care.")
    overlap = second[f"{metric}_ci_low"] <= high and low <= second[f"{metric}_ci_high"]
    text += f" 95% CI [{low:.3f}, {high:.3f}]; runner-up {second['run']} {second[metric]:.4f} " \
            f"[{second[f'{metric}_ci_low']:.3f}, {second[f'{metric}_ci_high']:.3f}]."
    p_value = None
    hits_a, hits_b = best["_per_prompt"].get(HIT_KEY), second["_per_prompt"].get(HIT_KEY)
    if metric == HIT_KEY and hits_a and hits_b and len(hits_a) == len(hits_b):
        p_value = mcnemar(hits_a, hits_b, best["_per_prompt"].get("prompt_ids"), second["_per_prompt"].get("prompt_ids"))["p_value"]
        text += f" McNemar p = {p_value:.3g}."
    if overlap or (p_value is not None and p_value >= ALPHA):
        text += " The difference is within noise: the CIs overlap" + (" / McNemar is not significant." if p_value is not None and p_value >= ALPHA else ".")
    return best, text


def write_results(sweep: Sweep, best_by: str = "auto") -> str:
    """Write results.csv, results.md and the plots into the sweep directory; return results.md's text."""
    scalars = {run.run_id: read_scalars(run_dir(sweep, run)) for run in sweep.runs}
    rows = [collect_row(sweep, run, scalars[run.run_id]) for run in sweep.runs]
    columns = ["run", "version", "status", *sweep.keys, *METRIC_COLUMNS, *INFO_COLUMNS]
    if best_by == "auto":
        best_by = HIT_KEY if any(_number(r.get(HIT_KEY)) is not None for r in rows) else "val_reward_accuracy"
    if best_by not in columns:
        raise SweepInputError(f"--best-by {best_by}: not a results column; choose one of {', '.join(METRIC_COLUMNS[:5])}")
    with atomic_path(sweep.directory / "results.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows])
    plots = plot_loss_curves(sweep, scalars) + plot_metrics(sweep, rows)
    _, sentence = best_run(rows, best_by)
    shown = [c for c in columns if c != "version" and any(r.get(c) not in (None, "") for r in rows)]
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Base config `{sweep.config}`; {'cartesian product' if sweep.product else 'one-at-a-time ablations'} "
             f"over {', '.join(f'`{k}`' for k in sweep.keys)}; runs in `{sweep.directory}/version_N`.", "",
             sentence, "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    lines += ["", "Plots: " + ", ".join(f"`{p.relative_to(sweep.directory)}`" for p in plots), ""]
    text = "\n".join(lines)
    write_text(sweep.directory / "results.md", text)
    return text


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|").replace("\n", " ")
