"""Files on disk: where lit_dpo caches things, the one atomic writer, and the safe checkpoint reader.

Every file another process may read while it is written (a data split, a cached conversion, a cache of
reference log-probs, an exported model, a sweep's state) is written through :func:`atomic_path`: into a
temporary sibling that is renamed over the target when complete, so a killed writer never leaves half a
file that looks valid. Checkpoints are read with `weights_only=True` only: a file someone else made
holds tensors and plain values, never code to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lit_dpo.errors import UserInputError


def cache_root() -> Path:
    """Where converted models, synthetic data and cleaned copies are cached (`LIT_DPO_CACHE`, else
    ~/.cache/lit_dpo)."""
    return Path(os.environ.get("LIT_DPO_CACHE", Path.home() / ".cache" / "lit_dpo"))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """A temporary sibling of `target` to write into; it becomes `target` when the block ends without error.

    Args:
        target: The file (or, with `directory`, the folder) to produce; parent folders are created.
        directory: Yield an empty temporary folder instead of a file path.
        replace: For a folder, remove an existing `target` first (a rename cannot replace a non-empty
            folder); the old content is never mixed with the new.

    Raises:
        OSError: From the final rename, e.g. when another process created a folder `target` first
            (`replace=False`); the temporary sibling is removed either way.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    else:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".tmp")
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        if directory and replace and target.is_dir():
            shutil.rmtree(target)
        elif directory and replace and target.exists():
            target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON with a final newline, atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write `records` as JSON lines to `path` atomically (a concurrent reader never sees a partial file).

    Args:
        records: JSON-serialisable dicts, one per line.
        path: Destination file; parent directories are created.

    Returns:
        The destination path.
    """
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def read_checkpoint(
    path: str | os.PathLike,
    *,
    option: str,
    required: tuple[str, ...],
    hint: str,
    error: type[UserInputError] = UserInputError,
) -> dict:
    """A lit_dpo `.ckpt` read safely (tensors and plain values only), with one-line errors.

    Args:
        path: The checkpoint file, shown in messages as given.
        option: The setting that named it, for messages (e.g. `export --ckpt_path`, `model.init_adapter`).
        required: Top-level keys it must hold (e.g. `state_dict`).
        hint: What to give instead, appended to the not-found message.
        error: The `UserInputError` subclass to raise.

    Raises:
        UserInputError: (as `error`) Not found, not readable as a checkpoint, or missing a required key.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise error(f"{option}: not found: {path} ({hint})")
    import torch  # here, so that the writers above stay usable without torch

    try:
        # weights_only: a checkpoint holds tensors and plain values; unpickling code is never needed
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as failure:  # noqa: BLE001 - any unpickling failure means "not a readable checkpoint"
        raise error(f"{option}: {path} is not a readable checkpoint ({type(failure).__name__})") from failure
    if not isinstance(checkpoint, dict) or not set(required) <= checkpoint.keys():
        raise error(f"{option}: {path} has no {'/'.join(required)}; give a checkpoint written by python -m lit_dpo fit")
    return checkpoint
