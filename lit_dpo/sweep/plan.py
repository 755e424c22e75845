"""Planning a sweep: which configurations run, in which `version_N`, and which reuse another's checkpoints.

Each grid `KEY=V1,V2,...` names any dotted config key. Several grids are one-at-a-time ablations
around the base config (a run per value, the other keys at their base value; the base config itself
runs once); `product` runs the cartesian product. Every run is `python -m lit_dpo fit` in its own
`tb_logs/<name>/version_N`, the version fixed at first planning (`sweep.json`) so that re-running the
same command finds each run again. `lit_dpo.sweep.runs` runs them; `lit_dpo.sweep.results` writes
`results.csv`, `results.md` and the plots. The command is `lit_dpo.commands.sweep`; see docs/sweeps.md.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_dpo.errors import UserInputError
from lit_dpo.files import write_json

EPOCHS_KEY = "trainer.max_epochs"
SCHEDULE_KEY = "model.lr_scheduler_type"
PLAN_FILE = "sweep.json"


class SweepInputError(UserInputError):
    """A bad `sweep` argument (grid syntax, config file, shard)."""


@dataclass
class PlannedRun:
    """One configuration of the sweep.

    Attributes:
        run_id: `base` or the varied values, e.g. `model.beta=0.05`; stable across re-runs.
        overrides: Swept key → value as typed on the command line (passed to `fit` verbatim).
        version: TensorBoard version number: the run lives in `<sweep dir>/version_<version>`.
        values: Swept key → effective value (override, else base config value), for the tables.
        reuse_of: For an epoch ablation served from a longer run's checkpoint: that run's run_id.
        reuse_exact: Whether that reuse gives exactly what training this run would (see docs).
    """

    run_id: str
    overrides: dict[str, str]
    version: int = -1
    values: dict[str, Any] = field(default_factory=dict)
    reuse_of: str | None = None
    reuse_exact: bool = True


@dataclass
class Sweep:
    """A planned sweep: where it lives, its runs, and how to launch `fit` for them."""

    name: str
    directory: Path
    config: Path
    keys: list[str]
    product: bool
    runs: list[PlannedRun]
    fit_args: list[str]
    base: dict[str, Any]


def parse_value(text: str) -> Any:
    """`"0.05"` → 0.05, `"5"` → 5, `"1e-5"` → 1e-05, `"true"` → True, anything else as YAML or text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """`"model.beta=0.05,0.1"` → `("model.beta", ["0.05", "0.1"])`.

    Raises:
        SweepInputError: No `=`, a key that is not dotted, or no values.
    """
    key, sep, values = spec.partition("=")
    key = key.strip().removeprefix("--")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", key) or not items:
        raise SweepInputError(
            f"--grid {spec!r}: expected KEY=V1,V2,... with a (dotted) config key, e.g. --grid model.beta=0.05,0.1,0.2"
        )
    if len(set(items)) != len(items):
        raise SweepInputError(f"--grid {spec!r}: a value is listed twice")
    return key, items


def lookup(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """The value of dotted `key` in a LightningCLI config, also under `init_args` (class_path style)."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def command_line_values(fit_args: list[str]) -> dict[str, Any]:
    """`--key=value` / `--key value` pairs among the extra fit arguments (they override the base config)."""
    values, i = {}, 0
    while i < len(fit_args):
        arg = fit_args[i]
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg[2:].partition("=")
            values[key] = parse_value(value)
        elif arg.startswith("--") and i + 1 < len(fit_args) and not fit_args[i + 1].startswith("--"):
            values[arg[2:]] = parse_value(fit_args[i + 1])
            i += 1
        i += 1
    return values


def effective(base: dict[str, Any], fit_args: dict[str, Any], key: str, default: Any = None) -> Any:
    """A key's value before the sweep changes it: extra fit arguments, else the config file."""
    return fit_args[key] if key in fit_args else lookup(base, key, default)


def plan_overrides(grids: list[tuple[str, list[str]]], product: bool, base_value) -> list[dict[str, str]]:
    """The distinct configurations, as swept key → value text; `{}` is the base config.

    Args:
        grids: `(key, values)` per `--grid`, in command-line order.
        product: Cartesian product instead of one-at-a-time ablations.
        base_value: `key -> value` of the base configuration (None when the config does not set it).

    Returns:
        One dict per run, without overrides equal to the base value, first occurrence order.
    """
    if product:
        combos = [dict(zip([k for k, _ in grids], values)) for values in itertools.product(*[v for _, v in grids])]
    else:
        combos = [{key: value} for key, values in grids for value in values]
    seen, planned = set(), []
    for combo in combos:
        combo = {k: v for k, v in combo.items() if parse_value(v) != base_value(k)}
        identity = json.dumps(combo, sort_keys=True)
        if identity not in seen:
            seen.add(identity)
            planned.append(combo)
    return planned


def run_id_of(overrides: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"


def assign_versions(directory: Path, runs: list[PlannedRun]) -> None:
    """Give each run its version: the one it had in an earlier invocation (sweep.json), else a new one."""
    plan_path = directory / PLAN_FILE
    known = json.loads(plan_path.read_text())["versions"] if plan_path.is_file() else {}
    used = set(known.values()) | {
        int(p.name.removeprefix("version_")) for p in directory.glob("version_*") if p.name[8:].isdigit()
    }
    for run in runs:
        if run.run_id not in known:
            known[run.run_id] = max(used, default=-1) + 1
            used.add(known[run.run_id])
        run.version = known[run.run_id]
    write_json(plan_path, {"versions": known})  # atomic: shards started together never read half a file


def mark_epoch_reuse(sweep: Sweep, mode: str) -> None:
    """Serve shorter epoch counts from the longest run's per-epoch checkpoints where allowed.

    Runs that differ only in `trainer.max_epochs` form a group; its longest run trains (with
    `EpochCheckpoints`), the others are read off its `epochN.ckpt`. That equals training them only
    when the LR schedule ignores the total step count (`model.lr_scheduler_type:
    constant_with_warmup`); mode `exact` reuses only then, `approximate` always (labelled), `off` never.
    """
    if mode == "off" or EPOCHS_KEY not in sweep.keys:
        return
    groups: dict[str, list[PlannedRun]] = {}
    for run in sweep.runs:
        epochs = run.values.get(EPOCHS_KEY)
        if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0:
            rest = {k: v for k, v in run.overrides.items() if k != EPOCHS_KEY}
            groups.setdefault(json.dumps(rest, sort_keys=True), []).append(run)
    fit_values = command_line_values(sweep.fit_args)
    if effective(sweep.base, fit_values, "trainer.max_steps", -1) not in (-1, None):
        return  # a step budget cuts runs independently of max_epochs: nothing to share
    for group in groups.values():
        if len(group) < 2:
            continue
        longest = max(group, key=lambda r: r.values[EPOCHS_KEY])
        schedule = longest.overrides.get(SCHEDULE_KEY) or effective(sweep.base, fit_values, SCHEDULE_KEY, "linear")
        exact = schedule == "constant_with_warmup"
        if not exact and mode != "approximate":
            continue
        for run in group:
            if run is not longest:
                run.reuse_of, run.reuse_exact = longest.run_id, exact


def plan(
    config: str | Path,
    grid: list[str],
    fit_args: list[str],
    *,
    product: bool = False,
    name: str | None = None,
    epoch_reuse: str = "exact",
) -> Sweep:
    """Read the base config and the grids; decide the runs, their versions and any epoch reuse.

    Args:
        config: The base config file (what `fit --config` takes).
        grid: `KEY=V1,V2,...` per swept key.
        fit_args: Extra `fit` arguments for every run (they override the base config).
        product: Cartesian product instead of one-at-a-time ablations.
        name: Sweep folder under the logger's save_dir; None: `<logger name>-sweep-<keys>`.
        epoch_reuse: `exact`, `approximate` or `off` (see `mark_epoch_reuse`).
    """
    config = Path(config)
    if not config.is_file():
        raise SweepInputError(f"--config {config}: no such file; pass a YAML config such as configs/balanced.yaml")
    try:
        base = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as error:
        raise SweepInputError(f"--config {config}: not valid YAML ({str(error).splitlines()[0]})") from None
    grids = [parse_grid(spec) for spec in grid]
    keys = [key for key, _ in grids]
    if len(set(keys)) != len(keys):
        raise SweepInputError("--grid: a key is given twice; list all its values in one --grid KEY=V1,V2")
    fit_values = command_line_values(fit_args)
    swept = set(keys) & set(fit_values)
    if swept:
        raise SweepInputError(f"{sorted(swept)[0]}: given both as --grid and as an extra fit argument; keep one")
    base_value = lambda key: effective(base, fit_values, key)  # noqa: E731
    save_dir = Path(str(effective(base, fit_values, "trainer.logger.init_args.save_dir", "tb_logs")))
    logger_name = effective(base, fit_values, "trainer.logger.init_args.name", config.stem)
    name = name or f"{logger_name}-sweep-" + "-".join(key.split(".")[-1] for key in keys)
    runs = []
    for overrides in plan_overrides(grids, product, base_value):
        values = {key: parse_value(overrides[key]) if key in overrides else base_value(key) for key in keys}
        runs.append(PlannedRun(run_id_of(overrides), overrides, values=values))
    sweep = Sweep(name, save_dir / name, config, keys, product, runs, fit_args, base)
    assign_versions(sweep.directory, runs)
    mark_epoch_reuse(sweep, epoch_reuse)
    return sweep
