"""The private parts of other libraries that lit_dpo needs and that have no public replacement, in one place.

Each function says why no public route exists. `tests/test_compat.py` checks every one of them against
the installed libraries, so an upgrade that renames or changes them fails there, loudly, instead of
somewhere in a run. Nothing else in lit_dpo touches another library's underscored names.
"""

from __future__ import annotations

from typing import Any


def save_last_checkpoint(checkpoint_callback: Any, trainer: Any) -> str:
    """Write `last.ckpt` now, through the run's ModelCheckpoint, as if it had saved it itself; its path.

    A guard that stops a run mid-epoch (divergence, memory) must leave that step's state in `last.ckpt`.
    `trainer.save_checkpoint` writes the file, but ModelCheckpoint would not know: at `on_train_end`, having
    saved nothing itself, it saves a "last" checkpoint again, with the loop state of a finished epoch (a
    resume from it skips the rest of the interrupted one), as `last-v1.ckpt` beside ours (over it with
    `enable_version_counter=False`). Its own "last" save records the step and the path, so neither
    happens. Lightning 2.6 has no public method for it (`ModelCheckpoint._save_last_checkpoint` and
    `_monitor_candidates`); tests/test_compat.py shows both behaviours.

    Should a Lightning release drop them, the state is still saved (with `trainer.save_checkpoint`, and the
    train-end duplicate comes back): a guard's checkpoint is never lost to an upgrade.

    Args:
        checkpoint_callback: The trainer's `ModelCheckpoint` (with `save_last` set).
        trainer: The running trainer; every process must call this (the save ends in a barrier).
    """
    if hasattr(checkpoint_callback, "_save_last_checkpoint") and hasattr(checkpoint_callback, "_monitor_candidates"):
        checkpoint_callback._save_last_checkpoint(trainer, checkpoint_callback._monitor_candidates(trainer))
        return checkpoint_callback.last_model_path
    path = checkpoint_callback.last_model_path or checkpoint_callback.format_checkpoint_name(
        {}, checkpoint_callback.CHECKPOINT_NAME_LAST
    )
    trainer.save_checkpoint(path, weights_only=checkpoint_callback.save_weights_only)
    return path


def attention_implementation(model: Any) -> str:
    """The attention backend a transformers model runs (`sdpa`, `eager`, `flash_attention_2`, ...).

    What was asked for at load time is not enough: with `attn_implementation=None` transformers picks
    one, and the shared-prompt mask has to be built for the one that runs (SDPA selects with a boolean
    mask, eager attention adds a float one). transformers keeps it in `config._attn_implementation`
    (its own docs read it there); no public accessor exists in transformers 5.
    """
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"
