"""Medians, ratios and loss agreement of the benchmark runs, as a console table and as Markdown."""

from __future__ import annotations

import statistics

LABELS = {"trl": "TRL DPOTrainer", "trl_precompute": "TRL + precompute_ref_log_probs", "lit_dpo": "lit_dpo"}


def _seconds_to_epoch(run: dict, epoch: int) -> float:
    # Same definition as bench_vs_trl.timed_seconds: start of the timed part to the end of `epoch`,
    # plus TRL's reference precompute (which it runs before `on_train_begin`).
    return run["epoch_ends"][epoch - 1] - run["start"] + (run["precompute_seconds"] or 0.0)


def _pre_train_seconds(run: dict) -> float:
    """Reference precompute (TRL) or everything between fit start and the first batch (lit_dpo)."""
    return (run["precompute_seconds"] or 0.0) + (run["train_start"] - run["start"])


def _loss_diffs(losses: list[float], reference: list[float], steps: int) -> tuple[float | None, float | None]:
    if not losses or not reference:
        return None, None
    n = min(steps, len(losses), len(reference))
    return abs(losses[0] - reference[0]), max(abs(a - b) for a, b in zip(losses[:n], reference[:n]))


def summarize(runs: list[dict], contenders: list[str], epochs: int, num_pairs: int, compare_steps: int) -> dict:
    """Per contender: median pairs/s after epoch 1 and after the last epoch, ratios to TRL, peak RSS and
    the loss agreement of its first run with TRL's first run.

    Args:
        runs: Results of `contenders.py`, in the order they ran.
        contenders: Names, "trl" first.
        epochs: Epochs per run.
        num_pairs: Training pairs per epoch.
        compare_steps: Leading optimizer steps whose losses are compared with TRL's.

    Returns:
        {"epochs", "compare_steps" (the steps actually compared: fewer when a run is shorter),
        "contenders": {name: row}}.
    """
    by_name = {name: [r for r in runs if r["contender"] == name] for name in contenders}
    trl_losses = by_name["trl"][0]["losses"]
    rows = {}
    for name, mine in by_name.items():
        step1_diff, max_diff = _loss_diffs(mine[0]["losses"], trl_losses, compare_steps)
        rows[name] = {
            "label": LABELS.get(name, name),
            "runs": len(mine),
            "pairs_per_s_1_epoch": statistics.median(num_pairs / _seconds_to_epoch(r, 1) for r in mine),
            f"pairs_per_s_{epochs}_epochs": statistics.median(num_pairs * epochs / _seconds_to_epoch(r, epochs) for r in mine),
            "pairs_per_s_all": [round(num_pairs * epochs / _seconds_to_epoch(r, epochs), 4) for r in mine],
            "pre_train_seconds": statistics.median(_pre_train_seconds(r) for r in mine),
            "peak_rss_gib": statistics.median(r["peak_rss_bytes"] / 2**30 for r in mine),
            "peak_rss_gib_max": max(r["peak_rss_bytes"] / 2**30 for r in mine),
            "step1_loss": mine[0]["losses"][0] if mine[0]["losses"] else None,
            "step1_loss_diff": step1_diff,
            "max_loss_diff": max_diff,
            "steps": len(mine[0]["losses"]),
        }
    base = rows["trl"]
    for row in rows.values():
        row["ratio_1_epoch"] = row["pairs_per_s_1_epoch"] / base["pairs_per_s_1_epoch"]
        row[f"ratio_{epochs}_epochs"] = row[f"pairs_per_s_{epochs}_epochs"] / base[f"pairs_per_s_{epochs}_epochs"]
    compared = min([compare_steps, *(len(r["losses"]) for r in runs)])
    return {"epochs": epochs, "compare_steps": compared, "contenders": rows}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    summary = results["summary"]
    epochs, steps = summary["epochs"], summary["compare_steps"]
    header = ["contender", "pairs/s 1 ep", "vs TRL", f"pairs/s {epochs} ep", "vs TRL", "precompute/setup s",
              "peak RSS GiB", "step-1 loss", "Δ step-1 vs TRL", f"max Δloss vs TRL, first {steps} steps"]  # fmt: skip
    rows = []
    for row in summary["contenders"].values():
        rows.append([
            row["label"],
            _fmt(row["pairs_per_s_1_epoch"], ".3f"), _fmt(row["ratio_1_epoch"], ".2f") + "×",
            _fmt(row[f"pairs_per_s_{epochs}_epochs"], ".3f"), _fmt(row[f"ratio_{epochs}_epochs"], ".2f") + "×",
            _fmt(row["pre_train_seconds"], ".1f"), _fmt(row["peak_rss_gib"], ".2f"),
            _fmt(row["step1_loss"], ".6f"), _fmt(row["step1_loss_diff"], ".1e"), _fmt(row["max_loss_diff"], ".1e"),
        ])  # fmt: skip
    if epochs == 1:  # the "after the last epoch" columns would repeat the 1-epoch ones
        header, rows = header[:3] + header[5:], [row[:3] + row[5:] for row in rows]
    return header, rows


def render_table(results: dict) -> str:
    """Fixed-width console table of the summary."""
    header, rows = _table_rows(results)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """results.md: settings, machine, data and the summary table."""
    s, m, d = results["settings"], results["machine"], results["data"]
    header, rows = _table_rows(results)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    kind = "QUICK SMOKE TEST (tiny random model; not a timing result)" if s["quick"] else "benchmark"
    return "\n".join([
        f"# lit_dpo vs TRL DPOTrainer: {kind}",
        "",
        f"- Machine: {m['cpu']} ({m['cpu_count']} logical CPUs), {m['threads']} torch threads per run; "
        f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; {m['date_utc']} UTC",
        f"- Run: {s['num_pairs']} pairs, batch {s['batch_size']}, {s['epochs']} epoch(s), {s['repeats']} alternating "
        f"repeat(s), lr {s['learning_rate']}, beta {s['beta']}, LoRA r=16 alpha=32 all-linear, dropout 0, fp32, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; lit_dpo overrides: "
        f"{', '.join(s['lit_arg']) or 'none'}",
        f"- Data: prompt {d['prompt_tokens_mean']:.1f} tokens (mean, chat template included), answers "
        f"{d['answer_tokens_min']}-{d['answer_tokens_max']} tokens (mean {d['answer_tokens_mean']:.1f}, EOS included); "
        f"answers tokenized differently by TRL and lit_dpo: {d['tokenization_mismatches']}",
        "- pairs/s = pairs trained / (seconds from the start of training to the end of that epoch + reference "
        "precompute); medians over the repeats. Δ: absolute loss difference, first run of each contender against "
        "TRL's first run.",
        "",
        *table,
        "",
    ])  # fmt: skip
