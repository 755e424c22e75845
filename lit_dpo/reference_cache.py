"""Reference log-probs computed once per dataset and reused across epochs, runs and resumes.

The reference model never changes during a run (LoRA: adapters off or the frozen SFT adapter; full
fine-tuning: a frozen copy), yet a plain DPO step recomputes its log-probs for every pair of every
epoch. Computing them once was worth 1.3–1.4× on SmolLM2 (shared/reference/performance.md).

How it fits together:
- The CLI connects the data module with a `ReferenceLogps` of the module
  (`PreferenceDataModule.connect(reference_logps=...)`). When Lightning asks the data module for a
  loader, the data module calls it with the split's tokenized rows and their fingerprint and attaches
  the result as a `reference_logps` column ([A] per row: chosen, then each rejected answer);
  `PreferenceCollator` stacks it into a [B, A] tensor, which `DPOModule.reference_logps` returns instead
  of running the reference. Loaders are built after Lightning's `configure_model` and strategy set-up,
  so the model is built and on its device; the reference depends on nothing restored from a checkpoint
  (only trainable weights are checkpointed), so computing before the restore is exact.
- The values come from `DPOModule.reference_logps` (the path the live reference takes) in eval mode,
  without grad, under the trainer's precision context, on batches built by the data module's collator.
- Cache file `reference_logps-<digest>.pt` lies next to the dataset's Arrow cache files (in-memory
  datasets: `cache_root()/reference_logps`). The digest covers everything that changes the values
  (`cache_key`), so a changed setting names a different file and stale values are never read.
- DDP: ranks agree on hit or miss (`reduce_boolean_decision`), so they either all load or all
  compute; each computes a strided shard and `all_gather` reassembles, so every rank ends with the
  same values; rank 0 writes the file. With one process both calls are no-ops.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader

from lit_dpo.files import atomic_path, cache_root
from lit_dpo.models.sources import resolve_model_path

CACHE_FORMAT_VERSION = 1  # bump when the values for the same key would change (e.g. a new log-prob path)


class ReferenceLogps:
    """The reference log-probs of a data module's rows, for `PreferenceDataModule.connect`.

    Args:
        module: The DPOModule whose reference is scored; attached to a trainer when called.
    """

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, split: str, dataset: datasets.Dataset, fingerprint: str, collator: Callable,
                 batch_size: int) -> torch.Tensor | None:
        """[N, A] reference log-probs of `dataset`'s rows, loaded from the cache or computed (and cached).

        Args:
            split: "train", "val" or "test", for the log line.
            dataset: Tokenized rows, as the data module's loaders serve them.
            fingerprint: What identifies those rows (`PreferenceDataModule.fingerprints`).
            collator: The data module's batch builder (the layout in use).
            batch_size: Pairs per forward pass.

        Returns:
            The values, or None when they would not match what a live reference computes (half-precision
            weights), after a warning: the reference then runs every step.
        """
        trainer = self.module.trainer
        if trainer.precision_plugin.convert_input(torch.zeros(1)).dtype != torch.float32:
            rank_zero_warn(
                f"reference log-probs: trainer.precision={trainer.precision} converts the weights and every float "
                "in a batch to another dtype; cached values would not match, so the reference runs every step instead"
            )
            return None
        key = cache_key(fingerprint, self.module.hparams, str(trainer.precision))
        path = cache_path(dataset, key_digest(key))
        started = time.perf_counter()
        logps = load(path, key, len(dataset))
        if trainer.strategy.reduce_boolean_decision(logps is not None, all=True):
            rank_zero_info(f"reference log-probs ({split}, {len(dataset)} pairs): loaded from cache {path}")
            return logps
        # a cache hit draws no random numbers, so a miss must not either (the DataLoader draws a seed):
        # otherwise dropout masks after a computing run differ from those after a loading one
        with isolate_rng():
            logps = compute_reference_logps(self.module, dataset, collator, batch_size)
        if trainer.is_global_zero:
            save(path, key, logps)
        rank_zero_info(
            f"reference log-probs ({split}, {len(dataset)} pairs): computed in {time.perf_counter() - started:.1f} s, "
            f"cached at {path}"
        )
        return logps


# ------------------------------------------------------------------------------------ computing
@torch.no_grad()
def compute_reference_logps(module: Any, dataset: datasets.Dataset, collator, batch_size: int) -> torch.Tensor:
    """Reference log-probs [N, A] for every row of `dataset`, the same on every process.

    Each process computes the rows `rank, rank + world, ...` (padded to equal counts, so the
    collective stays in step), and `all_gather` puts the rows back in dataset order.
    """
    trainer = module.trainer
    rank, world = trainer.global_rank, trainer.world_size
    indices = shard_indices(len(dataset), rank, world)
    loader = DataLoader(dataset.select(indices), batch_size=batch_size, shuffle=False, collate_fn=collator)
    modes = {m: m.training for m in module.modules()}
    module.eval()  # no dropout: the reference is deterministic
    try:
        parts = []
        with trainer.precision_plugin.forward_context():
            for batch in loader:
                batch = move_data_to_device(batch, trainer.strategy.root_device)
                parts.append(module.reference_logps(batch).float())
    finally:
        for submodule, training in modes.items():
            submodule.train(training)
    local = torch.cat(parts)
    gathered = trainer.strategy.all_gather(local)  # [world, n, A]; with one process just [n, A]
    return unshard(gathered.reshape(world, *local.shape).cpu(), len(dataset))


def shard_indices(num_rows: int, rank: int, world: int) -> list[int]:
    """Rows `rank, rank + world, ...`, padded with row 0 to `ceil(num_rows / world)` rows on every rank."""
    per_rank = -(-num_rows // world)
    own = list(range(rank, num_rows, world))
    return own + [0] * (per_rank - len(own))


def unshard(gathered: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Inverse of `shard_indices`: [world, per_rank, A] -> [num_rows, A] in dataset order."""
    # row i of rank r is dataset row i * world + r; padding rows land at positions >= num_rows
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:num_rows]


# -------------------------------------------------------------------------------------- caching
def cache_key(dataset_fingerprint: str, hparams: Any, precision: str) -> dict:
    """Everything that changes the reference log-probs of a dataset's rows.

    Args:
        dataset_fingerprint: What identifies the tokenized rows (source rows, tokenizer, lengths).
        hparams: DPOModule hyper-parameters (model, dtype, quantization, finetuning, init_adapter...).
        precision: `trainer.precision` (autocast changes the numbers).
    """
    init_adapter = getattr(hparams, "init_adapter", None)
    return {
        "version": CACHE_FORMAT_VERSION,
        "dataset": dataset_fingerprint,
        "model": model_identity(hparams.model_name_or_path),
        "dtype": hparams.dtype,
        "quantization": hparams.quantization,
        "finetuning": hparams.finetuning,
        "attn_implementation": hparams.attn_implementation,
        "precision": precision,
        "init_adapter": init_adapter,
        "init_adapter_digest": content_digest(Path(init_adapter).expanduser()) if init_adapter else None,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def model_identity(name_or_path: str) -> dict:
    """The resolved model plus what identifies its weights: config hash and weight files' size/mtime,
    or for a hub id the cached snapshot's commit."""
    resolved = resolve_model_path(name_or_path)
    directory = Path(resolved)
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved, "config.json")
        return {"name": resolved, "snapshot": Path(cached).parent.name if isinstance(cached, str) else None}
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    config = directory / "config.json"
    return {
        "name": str(directory.resolve()),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def content_digest(path: Path) -> str:
    """sha256 over a file, or over every file of a directory (names and contents)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_path(dataset: datasets.Dataset, digest: str) -> Path:
    """Next to the dataset's Arrow cache; under `cache_root()` for an in-memory dataset."""
    if dataset.cache_files:
        directory = Path(dataset.cache_files[0]["filename"]).parent
    else:
        directory = cache_root() / "reference_logps"
    return directory / f"reference_logps-{digest}.pt"


def load(path: Path, key: dict, num_rows: int) -> torch.Tensor | None:
    """The cached [N, A] tensor, or None when absent, unreadable or made for another key / row count."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file is a miss, recomputed and rewritten
        rank_zero_warn(f"reference log-probs: ignoring unreadable cache {path} ({type(error).__name__})")
        return None
    if not isinstance(stored, dict) or stored.get("key") != json.dumps(key, sort_keys=True):
        return None
    logps = stored.get("logps")
    return logps if isinstance(logps, torch.Tensor) and logps.shape[0] == num_rows else None


def save(path: Path, key: dict, logps: torch.Tensor) -> None:
    """Write atomically: a killed run never leaves a half-written cache."""
    with atomic_path(path) as tmp:
        torch.save({"key": json.dumps(key, sort_keys=True), "logps": logps.contiguous()}, tmp)
