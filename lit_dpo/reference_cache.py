"""Reference log-probs computed once per dataset and reused across epochs, runs and resumes.

The reference model never changes during a run (LoRA: adapters off or the frozen SFT adapter; full
fine-tuning: a frozen copy), yet a plain DPO step recomputes its log-probs for every pair of every
epoch. Computing them once was worth 1.3–1.4× on SmolLM2 (shared/reference/performance.md).

How it fits together:
- `DPOModule.setup` (every stage: fit → train and val splits, validate → val, test/predict → test)
  builds the model the way Lightning's own `configure_model` call would, moves it to the root device
  and calls `attach_to_datamodule`. No later hook will do: Lightning builds the train loader while
  configuring optimizers (`estimated_stepping_batches`), before `on_fit_start`, and the loaders of
  validate/test before their first hook. The reference does not depend on anything restored from a
  checkpoint (only trainable weights are checkpointed), so computing before the restore is exact.
- The values come from `DPOModule.reference_logps` (the path the live reference takes) in eval mode,
  without grad, under the trainer's precision context, on batches of `eval_batch_size` pairs built by
  the data module's own collator. They become a float column `reference_logps` ([A] per row: chosen,
  then each rejected answer); `PreferenceCollator` stacks it into a [B, A] tensor, which
  `DPOModule.reference_logps` returns instead of running the reference.
- Cache file `reference_logps-<digest>.pt` lies next to the dataset's Arrow cache files (in-memory
  datasets: `cache_root()/reference_logps`). The digest covers everything that changes the values
  (`cache_key`), so a changed setting names a different file and stale values are never read.
- DDP: ranks agree on hit or miss (`reduce_boolean_decision`), so they either all load or all
  compute; each computes a strided shard and `all_gather` reassembles, so every rank ends with the
  same column; rank 0 writes the file. With one process both calls are no-ops.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader

from lit_dpo.data.collate import REFERENCE_KEY
from lit_dpo.models import cache_root, resolve_model_path

COLUMN = REFERENCE_KEY  # the batch key DPOModule.reference_logps looks for
CACHE_FORMAT_VERSION = 1  # bump when the values for the same key would change (e.g. a new log-prob path)
# attached dataset fingerprint -> fingerprint of the same rows without the column (this process only)
_PLAIN_FINGERPRINTS: dict[str, str] = {}


def attach_to_datamodule(module: Any, splits: tuple[str, ...]) -> None:
    """Give the data module's `<split>_dataset`s a `reference_logps` column, from the cache or computed.

    Args:
        module: The DPOModule, attached to a trainer, its model built and on the root device.
        splits: Data module splits, e.g. ("train", "val") for fit, ("test",) for test.
    """
    trainer = module.trainer
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "collator"):
        rank_zero_info("reference log-probs: no PreferenceDataModule attached; the reference runs every step")
        return
    if trainer.precision_plugin.convert_input(torch.zeros(1)).dtype != torch.float32:
        rank_zero_warn(
            f"reference log-probs: trainer.precision={trainer.precision} converts the weights and every float in "
            "a batch to another dtype; cached values would not match, so the reference runs every step instead"
        )
        return
    for split in splits:
        dataset = getattr(datamodule, f"{split}_dataset", None)
        if dataset is not None and len(dataset) > 0:
            attached = attach(module, dataset, split, datamodule.collator, datamodule.eval_batch_size)
            setattr(datamodule, f"{split}_dataset", attached)


def attach(module: Any, dataset: datasets.Dataset, split: str, collator, batch_size: int) -> datasets.Dataset:
    """`dataset` with a `reference_logps` column [A] per row (its plain rows' values), loaded or computed."""
    trainer = module.trainer
    plain_fingerprint = _PLAIN_FINGERPRINTS.get(dataset._fingerprint, dataset._fingerprint)
    key = cache_key(plain_fingerprint, module.hparams, str(trainer.precision))
    digest = key_digest(key)
    attached_fingerprint = hashlib.sha256(f"{plain_fingerprint}|{digest}".encode()).hexdigest()[:32]
    if dataset._fingerprint == attached_fingerprint:
        return dataset  # already attached in this process under the same key
    plain = dataset.remove_columns(COLUMN) if COLUMN in dataset.column_names else dataset
    path = cache_path(plain, digest)

    started = time.perf_counter()
    logps = load(path, key, len(plain))
    if not trainer.strategy.reduce_boolean_decision(logps is not None, all=True):
        # a cache hit draws no random numbers, so a miss must not either (the DataLoader draws a seed):
        # otherwise dropout masks after a computing run differ from those after a loading one
        with isolate_rng():
            logps = compute_reference_logps(module, plain, collator, batch_size)
        if trainer.is_global_zero:
            save(path, key, logps)
        rank_zero_info(
            f"reference log-probs ({split}, {len(plain)} pairs): computed in {time.perf_counter() - started:.1f} s, "
            f"cached at {path}"
        )
    else:
        rank_zero_info(f"reference log-probs ({split}, {len(plain)} pairs): loaded from cache {path}")
    # float64 holds every float32 exactly; the collator turns the column back into float32
    attached = plain.add_column(COLUMN, logps.double().tolist(), new_fingerprint=attached_fingerprint)
    _PLAIN_FINGERPRINTS[attached_fingerprint] = plain_fingerprint
    return attached


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
                batch = {k: v for k, v in batch.items() if k != COLUMN}
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
        dataset_fingerprint: `_fingerprint` of the tokenized dataset (source rows, tokenizer, lengths).
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
    """Write atomically (temporary file + rename): a killed run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(handle)
    try:
        torch.save({"key": json.dumps(key, sort_keys=True), "logps": logps.contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
