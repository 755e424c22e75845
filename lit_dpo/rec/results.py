"""`results.json`: what `test` writes into a run directory and `report` and `sweep` read back.

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

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_dpo.errors import UserInputError
from lit_dpo.files import write_text

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
HIT_KEY = "hit@1"


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


def write_results(
    results: dict[str, Any],
    run_dir: Path,
    *,
    run: str,
    loss_type: str | None,
    beta: float | None,
    learning_rate: float | None,
    epochs: int | None,
) -> Path:
    """Write `results.json` (the schema above) and a small `results.md` table into `run_dir`.

    Args:
        results: The output of `lit_dpo.rec.scoring.evaluate_ranking`.
        run_dir: The run directory (created if missing).
        run: Display name; loss_type, beta, learning_rate, epochs: the run's hyperparameters (None if unknown).

    Returns:
        The path of `results.json`.
    """
    if "metrics" not in results:
        raise UserInputError("results: missing `metrics`; pass the dict returned by evaluate_ranking")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "run": run,
        "loss_type": loss_type,
        "beta": beta,
        "learning_rate": learning_rate,
        "epochs": epochs,
        **{k: v for k, v in results.items() if k not in ("run", "loss_type", "beta", "learning_rate", "epochs")},
    }
    path = write_text(run_dir / RESULTS_FILE, json.dumps(payload, indent=2))
    lines = [f"# {run}", "", f"Headline: {results.get('headline', HIT_KEY)}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in results["metrics"].items()]
    write_text(run_dir / "results.md", "\n".join(lines) + "\n")
    return path
