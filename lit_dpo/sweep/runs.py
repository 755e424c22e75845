"""Running a planned sweep: one `python -m lit_dpo fit` subprocess per configuration.

A subprocess per run is the same code path as `fit` itself, keeps one run's crash or OOM from taking
the sweep down and gives each run back all its memory. Each run's state lives in its own file,
`<sweep dir>/runs/version_N.json` (status running / done / failed, error, attempts, wall time), and
its console output in `<sweep dir>/logs/version_N.log`, so separate shards never write one file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lit_dpo.files import write_json, write_text
from lit_dpo.rec.results import RESULTS_FILE
from lit_dpo.sweep.plan import EPOCHS_KEY, PlannedRun, Sweep

EPOCH_CALLBACK = "lit_dpo.callbacks.EpochCheckpoints"
REUSE_FILE = "reused_checkpoint.json"


def run_dir(sweep: Sweep, run: PlannedRun) -> Path:
    return sweep.directory / f"version_{run.version}"


def record_path(sweep: Sweep, run: PlannedRun) -> Path:
    return sweep.directory / "runs" / f"version_{run.version}.json"


def load_record(sweep: Sweep, run: PlannedRun) -> dict[str, Any]:
    """The run's state file, or a fresh `pending` record."""
    path = record_path(sweep, run)
    if path.is_file():
        return json.loads(path.read_text())
    return {"run_id": run.run_id, "status": "pending", "attempts": 0, "wall_s": 0.0, "error": None}


def save_record(sweep: Sweep, run: PlannedRun, record: dict[str, Any]) -> None:
    write_json(record_path(sweep, run), record)  # atomic: a sweep killed mid-write leaves no half record


def run_sweep(sweep: Sweep, test: bool = True, shard: tuple[int, int] | None = None) -> int:
    """Train (or resume, or reuse) every run of `sweep` that is not done yet.

    Args:
        sweep: The plan from `lit_dpo.sweep.plan.plan`.
        test: Run `python -m lit_dpo test` after each fit (results.json for HR@1 / NDCG).
        shard: `(i, n)`: only every n-th trained run starting at i, with the runs reusing its checkpoints.

    Returns:
        How many of this invocation's runs are failed at the end.
    """
    trained = [run for run in sweep.runs if run.reuse_of is None]
    mine = trained if shard is None else trained[shard[0] :: shard[1]]
    failed = 0
    for number, run in enumerate(mine, 1):
        print(f"[sweep] {number}/{len(mine)} {run.run_id} -> {run_dir(sweep, run)}", flush=True)
        ok = train(sweep, run, test)
        failed += not ok
        for child in [r for r in sweep.runs if r.reuse_of == run.run_id]:
            ok_child = reuse_epoch_checkpoint(sweep, run, child, test) if ok else record_source_failed(sweep, run, child)
            failed += not ok_child
    return failed


def train(sweep: Sweep, run: PlannedRun, test: bool) -> bool:
    """Fit one run unless it is done; resume from its own last.ckpt when one exists. True when done."""
    record = load_record(sweep, run)
    if record["status"] == "done":
        print("[sweep]   done before, skipped", flush=True)
        return True
    directory = run_dir(sweep, run)
    last = directory / "checkpoints" / "last.ckpt"
    command = fit_command(sweep, run, with_epoch_checkpoints=any(r.reuse_of == run.run_id for r in sweep.runs))
    if last.is_file():
        command += ["--ckpt_path", str(last)]
        print(f"[sweep]   resuming from {last}", flush=True)
    elif directory.exists():
        shutil.rmtree(directory)  # an attempt that died before its first checkpoint: start clean
    record.update(status="running", attempts=record["attempts"] + 1, error=None, resumed_from=str(last) if last.is_file() else None)
    save_record(sweep, run, record)
    returncode, seconds, error = run_logged(command, sweep.directory / "logs" / f"version_{run.version}.log")
    record["wall_s"] = round(record["wall_s"] + seconds, 2)
    if returncode != 0:
        record.update(status="failed", error=error or f"fit exited with code {returncode}")
        save_record(sweep, run, record)
        print(f"[sweep]   FAILED: {record['error']}", flush=True)
        return False
    record.update(status="done", test=run_test(sweep, run) if test else "off")
    save_record(sweep, run, record)
    print(f"[sweep]   done in {seconds:.0f} s (test: {record['test']})", flush=True)
    return True


def fit_command(sweep: Sweep, run: PlannedRun, with_epoch_checkpoints: bool) -> list[str]:
    """`python -m lit_dpo fit --config BASE [extra args] --KEY=VALUE ...` logging into the run's own version dir."""
    command = [sys.executable, "-m", "lit_dpo", "fit", "--config", str(sweep.config), *sweep.fit_args]
    command += [f"--{key}={value}" for key, value in run.overrides.items()]
    command += [
        f"--trainer.logger.init_args.save_dir={sweep.directory.parent}",
        f"--trainer.logger.init_args.name={sweep.name}",
        f"--trainer.logger.init_args.version={run.version}",
    ]
    if with_epoch_checkpoints:
        command.append(f"--trainer.callbacks+={EPOCH_CALLBACK}")
    return command


def run_logged(command: list[str], log: Path) -> tuple[int, float, str | None]:
    """Run `command`, appending its output to `log`. Returns (exit code, seconds, error line or None)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            returncode = process.wait()
        except BaseException:  # the sweep is stopped (Ctrl-C, SIGTERM): stop its run too, not orphan it
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    seconds = time.monotonic() - started
    return returncode, seconds, error_line(log) if returncode else None


def error_line(log: Path) -> str | None:
    """The line that says what went wrong: lit_dpo's one-line error, else the exception at the end."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("lit_dpo: error:"):
            return line.removeprefix("lit_dpo: error:").strip()
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and not line.startswith(("File ", "$ ", "raise ")):
            return line[:500]
    return lines[-1][:500] if lines else None


def run_test(sweep: Sweep, run: PlannedRun) -> str:
    """`python -m lit_dpo test` on the run's last.ckpt; says whether results.json came out of it."""
    directory = run_dir(sweep, run)
    (directory / RESULTS_FILE).unlink(missing_ok=True)
    command = [sys.executable, "-m", "lit_dpo", "test", "--config", str(directory / "config.yaml"),
               "--ckpt_path", str(directory / "checkpoints" / "last.ckpt")]
    returncode, _, error = run_logged(command, sweep.directory / "logs" / f"version_{run.version}.log")
    if returncode != 0:
        return f"failed: {error}"
    return "ok" if (directory / RESULTS_FILE).is_file() else "no results.json (test data without candidates?)"


def record_source_failed(sweep: Sweep, source: PlannedRun, run: PlannedRun) -> bool:
    record = load_record(sweep, run)
    record.update(status="failed", error=f"the run it reuses ({source.run_id}) failed")
    save_record(sweep, run, record)
    return False


def reuse_epoch_checkpoint(sweep: Sweep, source: PlannedRun, run: PlannedRun, test: bool) -> bool:
    """Make `run` (fewer epochs) a run directory of its own from `source`'s epoch checkpoint.

    The directory gets the checkpoint as `checkpoints/last.ckpt`, the source's config.yaml with this
    run's `trainer.max_epochs`, the source's TensorBoard scalars up to that epoch's last step and
    `reused_checkpoint.json` saying where it came from and whether that is exact.
    """
    record = load_record(sweep, run)
    if record["status"] == "done":
        return True
    source_dir, directory = run_dir(sweep, source), run_dir(sweep, run)
    epochs = run.values[EPOCHS_KEY]
    steps_file = source_dir / "checkpoints" / "epochs.json"
    steps = {int(k): v for k, v in json.loads(steps_file.read_text()).items()} if steps_file.is_file() else {}
    available = [e for e in steps if e <= epochs and (source_dir / "checkpoints" / f"epoch{e}.ckpt").is_file()]
    if not available:
        record.update(status="failed", error=f"{source.run_id} left no epoch checkpoint <= {epochs} in {source_dir}")
        save_record(sweep, run, record)
        return False
    epoch = max(available)  # < epochs only when the source stopped early (plateau/guard) before this epoch
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "checkpoints").mkdir(parents=True)
    shutil.copy2(source_dir / "checkpoints" / f"epoch{epoch}.ckpt", directory / "checkpoints" / "last.ckpt")
    write_config(source_dir / "config.yaml", directory / "config.yaml", sweep, run)
    copy_scalars(source_dir, directory, max_step=steps[epoch])
    for name in ("diagnosis.json",):  # peak memory of the source process; its findings cover all its epochs
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, directory / f"source_{name}")
    note = {"source_run": source.run_id, "source_version": source.version, "epoch": epoch, "step": steps[epoch],
            "exact": run.reuse_exact}
    if epoch < epochs:
        note["stopped_early"] = f"the source stopped after epoch {epoch}, so a {epochs}-epoch run would too"
    write_json(directory / REUSE_FILE, note)
    record.update(status="done", error=None, reused=note, test=run_test(sweep, run) if test else "off")
    save_record(sweep, run, record)
    print(f"[sweep]   {run.run_id}: epoch {epoch} checkpoint of {source.run_id} "
          f"({'exact' if run.reuse_exact else 'APPROXIMATE: linear schedule'}) -> {directory}", flush=True)
    return True


def write_config(source: Path, target: Path, sweep: Sweep, run: PlannedRun) -> None:
    """The source run's saved config with this run's epochs and version, without EpochCheckpoints."""
    config = yaml.safe_load(source.read_text())
    config["trainer"]["max_epochs"] = run.values[EPOCHS_KEY]
    logger = config["trainer"].get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"]["version"] = run.version
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [c for c in callbacks if not str(c.get("class_path", "")).endswith("EpochCheckpoints")] or None
    write_text(target, yaml.safe_dump(config, sort_keys=False))


def copy_scalars(source: Path, target: Path, max_step: int) -> None:
    """Copy the source's TensorBoard scalars with step <= max_step into an event file in `target`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    events = EventAccumulator(str(source), size_guidance={"scalars": 0})
    events.Reload()
    writer = SummaryWriter(str(target))
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            if event.step <= max_step:
                writer.add_scalar(tag, event.value, event.step, walltime=event.wall_time)
    writer.close()
