"""What a checkpoint needs beyond weights and optimizer for a resume to continue the same run.

Lightning restores weights, optimizer, scheduler and loop counters. An exact resume also needs the
RNG state (dropout masks), and each process's own share of it under DDP, and a resume that changes
`model.learning_rate` (the guide's "decrease LR by 2x, then resume") must rescale the restored
optimizer and schedule, which Lightning would otherwise put back as they were.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def gather_per_process(local: Any) -> list[Any]:
    """Every process's `local` (a collective: all processes must call it)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def own_state(checkpoint: dict, rank: int, world_size: int) -> dict:
    """This process's saved state: its own entry of `per_process_state` when the process count is
    unchanged, else (single-process checkpoint, or another count) process 0's, kept at the top level."""
    per_process = checkpoint.get("per_process_state")
    if per_process and len(per_process) == world_size:
        return per_process[rank]
    return checkpoint


def rescale_learning_rate(checkpoint: dict, new_lr: float) -> None:
    """Scale the checkpoint's optimizer and scheduler LRs by new/old, in place, before Lightning restores
    them; scaling (rather than setting) keeps any reduction made during the run (OscillationDetector)."""
    old = checkpoint.get("hyper_parameters", {}).get("learning_rate")
    if not old or new_lr == old:
        return
    ratio = new_lr / old
    for optimizer in checkpoint.get("optimizer_states", []):
        for group in optimizer["param_groups"]:
            for key in ("lr", "initial_lr"):
                if key in group:
                    group[key] *= ratio
    for scheduler in checkpoint.get("lr_schedulers", []):
        # base_lrs: what LambdaLR multiplies by the schedule at every step, so the next step's LR is rescaled
        # (get_last_lr() reports the rescaled value from that step on)
        if "base_lrs" in scheduler:
            scheduler["base_lrs"] = [lr * ratio for lr in scheduler["base_lrs"]]
