"""MemoryGuard ("VRAM guard"): watch memory every optimizer step, stop cleanly before an out-of-memory
crash, and turn a crash it could not prevent into a resumable checkpoint plus the guide's remedies.

The guide's MEMORY USAGE rules are checked as written: "Expected: Peaks at ~18-20 GB on RTX 3090",
"OK if: Fluctuates but doesn't OOM", "Bad: Steady increase → memory leak", "Bad: Consistently >22 GB
→ OOM risk", and its "Problem: OOM (out of memory)" remedies are printed with this run's values. On
CUDA the caching allocator is read (allocated, reserved, peak) against the card's total; on CPU the
process's resident memory against the machine's (or container's), so the logic runs without a GPU.
GB here are 2^30 bytes, as nvidia-smi and `torch.cuda.memory_summary` count them.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_dpo.callbacks.findings import Finding
from lit_dpo.callbacks.oom_remedies import OOM_RULE, current_values, first_remedy, render_remedies
from lit_dpo.compat import save_last_checkpoint
from lit_dpo.errors import ConfigError

GB = 2**30
MB = 2**20
PEAK_RULE = "Expected: Peaks at ~18-20 GB on RTX 3090"
NO_OOM_RULE = "OK if: Fluctuates but doesn't OOM"
LEAK_RULE = "Bad: Steady increase → memory leak"
SOFT_RULE = "Bad: Consistently >22 GB → OOM risk"


@dataclass(frozen=True)
class MemorySample:
    """One memory reading.

    Args:
        used_bytes: Bytes held by tensors (CUDA `memory_allocated`) or the resident set (CPU).
        peak_bytes: High-water mark of `used_bytes` since the process started.
        total_bytes: The card's memory (CUDA) or the machine's / container's memory (CPU).
        device: Where it was read, e.g. "cuda:0 (NVIDIA GeForce RTX 3090)" or "cpu".
        reserved_bytes: Bytes the CUDA caching allocator holds (>= used); None on CPU.
    """

    used_bytes: int
    peak_bytes: int
    total_bytes: int
    device: str
    reserved_bytes: int | None = None

    @property
    def held_bytes(self) -> int:
        """What the process holds from the device (reserved on CUDA): the limits apply to this."""
        return max(self.used_bytes, self.reserved_bytes or 0)


def cuda_reader(device: torch.device) -> Callable[[], MemorySample]:
    props = torch.cuda.get_device_properties(device)
    name = f"{device} ({props.name})"
    return lambda: MemorySample(torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
                                props.total_memory, name, torch.cuda.memory_reserved(device))


def cpu_reader() -> Callable[[], MemorySample]:
    process, total, peak = psutil.Process(), _cpu_total_bytes(), [0]

    def read() -> MemorySample:
        rss = process.memory_info().rss
        peak[0] = max(peak[0], rss, _max_rss_bytes())  # ru_maxrss also sees peaks between two readings
        return MemorySample(rss, peak[0], total, "cpu")

    return read


def is_out_of_memory(exception: BaseException) -> bool:
    """CUDA/MPS/CPU allocator failures and Python's MemoryError; not other RuntimeErrors."""
    if isinstance(exception, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exception).lower()
    return isinstance(exception, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


class MemoryGuard(L.Callback):
    """Log memory per optimizer step; warn at a soft limit, checkpoint and stop at a hard one, flag a
    steady increase (leak), and on an out-of-memory error leave a resumable `last.ckpt` plus remedies.

    Args:
        soft_limit: Warn once when held memory reaches this fraction of the device's total (None: off).
        soft_limit_gb: The soft limit in GB instead, e.g. the guide's 22 on a 24 GB card; overrides `soft_limit`.
        hard_limit: Save `last.ckpt` and stop when held memory reaches this fraction of the total (None: off).
        hard_limit_gb: The hard limit in GB instead; overrides `hard_limit`.
        warmup_steps: Optimizer steps ignored by the leak check (first steps allocate optimizer state, caches).
        leak_window_steps: Steps over which the leak slope is fitted (needs >= 8).
        leak_min_slope_mb_per_step: Smallest steady rise, in MB per optimizer step, called a leak;
            1 MB/step is ~2 GB over the guide's 3 × 755-step run, while fluctuation fits a slope near 0.
        log_every_n_steps: Log `memory/*` to the logger every n optimizer steps (0: never).
        reader: Returns a `MemorySample`; None picks CUDA or CPU from the trainer's device (tests inject one).
    """

    def __init__(
        self,
        soft_limit: float | None = 0.9,
        soft_limit_gb: float | None = None,
        hard_limit: float | None = 0.97,
        hard_limit_gb: float | None = None,
        warmup_steps: int = 10,
        leak_window_steps: int = 50,
        leak_min_slope_mb_per_step: float = 1.0,
        log_every_n_steps: int = 1,
        reader: Callable[[], MemorySample] | None = None,
    ) -> None:
        for key, value in (("soft_limit", soft_limit), ("hard_limit", hard_limit)):
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"MemoryGuard.{key} is a fraction of device memory in (0, 1] (got {value}); "
                                  f"use {key}_gb for a figure in GB, or null to turn it off")
        for key, value in (("soft_limit_gb", soft_limit_gb), ("hard_limit_gb", hard_limit_gb)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"MemoryGuard.{key} must be > 0 GB (got {value}), e.g. 22 on a 24 GB card")
        if soft_limit_gb is None and hard_limit_gb is None and soft_limit and hard_limit and soft_limit >= hard_limit:
            raise ConfigError(f"MemoryGuard: soft_limit ({soft_limit}) must be below hard_limit ({hard_limit}): "
                              "it warns before the hard limit stops the run")
        if warmup_steps < 0 or leak_window_steps < 8 or not leak_min_slope_mb_per_step > 0 or log_every_n_steps < 0:
            raise ConfigError("MemoryGuard: need warmup_steps >= 0, leak_window_steps >= 8, "
                              f"leak_min_slope_mb_per_step > 0, log_every_n_steps >= 0 (got {warmup_steps}, "
                              f"{leak_window_steps}, {leak_min_slope_mb_per_step}, {log_every_n_steps})")
        self.soft_limit, self.soft_limit_gb, self.hard_limit, self.hard_limit_gb = soft_limit, soft_limit_gb, hard_limit, hard_limit_gb
        self.warmup_steps, self.leak_window_steps = warmup_steps, leak_window_steps
        self.leak_min_slope_mb_per_step, self.log_every_n_steps = leak_min_slope_mb_per_step, log_every_n_steps
        self.reader = reader
        self.soft_bytes: int | None = None  # resolved in setup (resolve_limits), once the device's total is known
        self.hard_bytes: int | None = None
        self._last_step = -1
        self._current: dict[str, Any] = {}  # config values the remedies quote, read in setup
        # what was seen; kept in checkpoints so a resumed run reports the whole run
        self.seen: dict[str, Any] = {"peak": None, "steps": 0, "max_held": 0, "soft_steps": 0, "soft_first": None,
                                     "slope": None, "leak": None, "stopped": None}
        self.window: deque[float] = deque(maxlen=leak_window_steps)  # used MB, one per step after warm-up

    # ------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.reader is None:
            device = trainer.strategy.root_device
            self.reader = cuda_reader(device) if device.type == "cuda" else cpu_reader()
        self.resolve_limits(self.reader().total_bytes)
        self._current = current_values(trainer, pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run's first step is the next one

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # still accumulating: one reading per optimizer step
            return
        self._last_step = step
        sample = self.reader()
        if self.log_every_n_steps and step % self.log_every_n_steps == 0:
            metrics = {"memory/used_gb": sample.used_bytes / GB, "memory/peak_gb": sample.peak_bytes / GB}
            if sample.reserved_bytes is not None:
                metrics["memory/reserved_gb"] = sample.reserved_bytes / GB
            pl_module.log_dict(metrics)
        level, reason = self.check_limits(sample.held_bytes)
        reason = reason or "another process reached a memory limit"
        # any process over a limit decides for all of them, so every process stops at the same step
        soft = trainer.strategy.reduce_boolean_decision(level is not None, all=False)
        hard = trainer.strategy.reduce_boolean_decision(level == "hard", all=False)
        seen = self.seen
        seen["steps"] += 1
        seen["max_held"] = max(seen["max_held"], sample.held_bytes)
        if seen["peak"] is None or sample.peak_bytes > seen["peak"]["bytes"]:
            seen["peak"] = {"bytes": sample.peak_bytes, "step": step, "total": sample.total_bytes, "device": sample.device}
        if soft:
            seen["soft_steps"] += 1
            if seen["soft_first"] is None:  # warn once per run, resumes included
                seen["soft_first"] = step
                rank_zero_warn(f"MemoryGuard: {reason} at step {step}. Guide: \"{SOFT_RULE}\". "
                               f"To lower it: {first_remedy(self._current)}")
        if step > self.warmup_steps:
            self.window.append(sample.used_bytes / MB)
            if len(self.window) == self.leak_window_steps:
                seen["slope"] = self.leak_slope(self.window)
            leaking, why = self.is_leaking(self.window)
            if leaking and seen["leak"] is None:
                seen["leak"] = {"step": step, "reason": why}
                rank_zero_warn(f"MemoryGuard: {why}. Guide: \"{LEAK_RULE}\"; look for tensors kept across steps "
                               "(e.g. a logged loss without .detach() or .item()).")
        if hard:
            # recorded before the checkpoint is written, so a resumed run still reports why it stopped
            seen["stopped"] = stopped = {"rule": NO_OOM_RULE, "step": step, "resumed": False, "message": reason}
            stopped["message"] += f"; saved {self._save_resumable(trainer, on_exception=False)} and stopped"
            trainer.should_stop = True
            rank_zero_warn(f"MemoryGuard: {stopped['message']}. Change the config, then resume with "
                           f"--ckpt_path last.\n{render_remedies(self._current)}")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not is_out_of_memory(exception):
            return
        if pl_module is not None:  # gradients of the unfinished window are lost anyway; free them for the save
            pl_module.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        error = (str(exception).splitlines() or [""])[0][:200]
        step = trainer.global_step + 1  # the optimizer step that was running
        # recorded before the checkpoint is written, so a resumed run still reports what happened
        self.seen["stopped"] = stopped = {"rule": OOM_RULE, "step": step, "resumed": False,
                                          "message": f"{type(exception).__name__}: {error} in optimizer step {step}"}
        where = "no checkpoint (not fitting)"
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run:
            try:
                where = f"resumable checkpoint: {self._save_resumable(trainer, on_exception=True)}"
            except Exception as save_error:  # never hide the OOM behind a failed save
                where = f"could not save a checkpoint ({type(save_error).__name__}: {save_error})"
        stopped["message"] += f"; {where}"
        remedies_text = render_remedies(self._current or current_values(trainer, pl_module))
        rank = f"[rank {trainer.global_rank}] " if trainer.world_size > 1 else ""
        # printed by every process that ran out of memory, not only rank zero: it may be the only one
        print(f"\n{rank}MemoryGuard: {stopped['message']}\n{remedies_text}\n"
              "Then resume: add --ckpt_path last to the same command.\n", file=sys.stderr, flush=True)

    # --------------------------------------------------------------------------------- decisions
    def resolve_limits(self, total_bytes: int) -> None:
        """Turn the configured fractions / GB figures into byte limits for a device of `total_bytes`."""
        self.soft_bytes = _limit(self.soft_limit, self.soft_limit_gb, total_bytes)
        self.hard_bytes = _limit(self.hard_limit, self.hard_limit_gb, total_bytes)
        if self.soft_bytes is not None and self.hard_bytes is not None and self.soft_bytes >= self.hard_bytes:
            raise ConfigError(f"MemoryGuard: soft limit {self.soft_bytes / GB:.1f} GB is not below hard limit "
                              f"{self.hard_bytes / GB:.1f} GB on this {total_bytes / GB:.1f} GB device; lower soft_limit(_gb)")

    def check_limits(self, held_bytes: int) -> tuple[str | None, str]:
        """("hard" | "soft" | None, reason) for one reading of held memory in bytes."""
        for level, limit in (("hard", self.hard_bytes), ("soft", self.soft_bytes)):
            if limit is not None and held_bytes >= limit:
                return level, f"memory {held_bytes / GB:.2f} GB reached the {level} limit {limit / GB:.2f} GB"
        return None, ""

    def leak_slope(self, used_mb: Sequence[float]) -> float:
        """Least-squares slope of memory readings, in MB per optimizer step."""
        n = len(used_mb)
        mean_x, mean_y = (n - 1) / 2, sum(used_mb) / n
        var = sum((x - mean_x) ** 2 for x in range(n))
        return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(used_mb)) / var if var else 0.0

    def is_leaking(self, used_mb: Sequence[float]) -> tuple[bool, str]:
        """(leaking, reason) for the last `leak_window_steps` readings (MB, one per step, after warm-up).

        A leak is a *steady* rise: the fitted slope is at least `leak_min_slope_mb_per_step` and the median
        of each quarter of the window exceeds the previous one by at least half of what that slope
        predicts. Fluctuation around a flat level fits a slope near 0; a one-off jump (a new cache block,
        the first validation) rises in one quarter only.
        """
        if len(used_mb) < self.leak_window_steps:
            return False, ""
        values = list(used_mb)[-self.leak_window_steps:]
        slope = self.leak_slope(values)
        quarter = len(values) // 4
        medians = [statistics.median(values[i * quarter:(i + 1) * quarter]) for i in range(4)]
        steady = all(b - a >= slope * quarter / 2 for a, b in zip(medians, medians[1:]))
        if slope < self.leak_min_slope_mb_per_step or not steady:
            return False, ""
        return True, (f"memory rose steadily by {slope:+.1f} MB/step over the last {len(values)} steps "
                      f"({values[-1] - values[0]:+.0f} MB)")

    # ---------------------------------------------------------------------------------- reports
    def findings(self) -> list[Finding]:
        """The guide's MEMORY USAGE rules as seen in this run (for the Diagnosis report)."""
        name, seen, out = type(self).__name__, self.seen, []
        peak = seen["peak"]
        if peak is None and self.reader is not None:  # no optimizer step ran: report memory as it is now
            s = self.reader()
            peak = {"bytes": s.peak_bytes, "step": None, "total": s.total_bytes, "device": s.device}
        if peak is not None:
            out.append(Finding(name, PEAK_RULE, "ok", f"peak {peak['bytes'] / GB:.2f} GB of {peak['total'] / GB:.1f} GB "
                               f"({peak['bytes'] / peak['total']:.0%}) on {peak['device']}", step=peak["step"]))
        change = first_remedy(self._current, change_only=True)
        stopped = seen["stopped"]
        if self.soft_bytes is not None:
            limit = f"the soft limit {self.soft_bytes / GB:.2f} GB"
            if seen["soft_steps"]:
                out.append(Finding(name, SOFT_RULE, "advice", f"memory at or above {limit} in {seen['soft_steps']} of "
                                   f"{seen['steps']} steps (max {seen['max_held'] / GB:.2f} GB)",
                                   "" if stopped else change, seen["soft_first"]))  # a stop carries the change
            else:
                out.append(Finding(name, SOFT_RULE, "ok", f"memory stayed below {limit} in all {seen['steps']} steps"))
        if stopped is not None:
            kind, before = ("advice", "before the resume: ") if stopped["resumed"] else ("stop", "")
            out.append(Finding(name, stopped["rule"], kind, before + stopped["message"], change, stopped["step"]))
        else:
            hard = f"; stayed below the hard limit {self.hard_bytes / GB:.2f} GB" if self.hard_bytes else ""
            out.append(Finding(name, NO_OOM_RULE, "ok", f"no out-of-memory error{hard}"))
        if seen["leak"] is not None:
            out.append(Finding(name, LEAK_RULE, "advice", seen["leak"]["reason"] + "; look for tensors kept across steps",
                               step=seen["leak"]["step"]))
        elif seen["slope"] is None:
            out.append(Finding(name, LEAK_RULE, "ok", f"not enough steps to judge: {len(self.window)} after "
                               f"{self.warmup_steps} warm-up steps, the window is {self.leak_window_steps}"))
        else:
            out.append(Finding(name, LEAK_RULE, "ok", f"no steady increase (last {self.leak_window_steps} steps: "
                               f"{seen['slope']:+.2f} MB/step)"))
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.seen, "window": list(self.window)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen.update({k: v for k, v in state_dict.items() if k != "window"})
        self.window.extend(state_dict["window"])
        if self.seen["stopped"] is not None:  # that stop or OOM ended the previous attempt, not this one
            self.seen["stopped"] = {**self.seen["stopped"], "resumed": True}

    # ---------------------------------------------------------------------------------- helpers
    def _save_resumable(self, trainer: L.Trainer, on_exception: bool) -> Path:
        """Make sure `last.ckpt` (what `--ckpt_path last` resumes from) holds this step; return its path."""
        mc = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
        directory = Path(mc.dirpath) if mc and mc.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        last = directory / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        # ModelCheckpoint(save_on_exception=True) runs after every other callback and writes last.ckpt
        # itself, except at step 0 (it skips steps it considers saved, and it starts at 0): no double save.
        if on_exception and mc and mc.save_on_exception and mc.save_last and trainer.global_step > 0:
            return last
        if mc and mc.save_last:
            # ModelCheckpoint's own "last" save (lit_dpo.compat says why): it then counts this step as saved, so
            # its save at train end after `should_stop`, whose loop state would resume at the *next* epoch, does
            # not overwrite this mid-epoch state; it also keeps last.ckpt's name (no last-v1.ckpt).
            last = Path(save_last_checkpoint(mc, trainer))
        else:
            trainer.save_checkpoint(last)
        rank_zero_info(f"MemoryGuard: saved {last}")
        return last


# --------------------------------------------------------------------------------------- helpers
def _limit(fraction: float | None, gb: float | None, total: int) -> int | None:
    if gb is not None:
        return int(gb * GB)
    return None if fraction is None else int(fraction * total)


def _max_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _cpu_total_bytes() -> int:
    """The machine's memory, or the container's limit when that is lower (cgroup v2, then v1)."""
    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total
