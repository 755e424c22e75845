"""Reference log-probs computed once and cached (`model.precompute_reference`): exactness, reuse, invalidation."""

from __future__ import annotations

import json
import os
import shutil

import datasets
import pytest
import torch
import lightning as L

from lit_dpo import reference_cache
from lit_dpo.module import DPOModule
from tests.test_training import run_cli, write_pairs


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_DPO_CACHE", str(tmp_path / "lit_dpo_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


@pytest.fixture
def computes(monkeypatch) -> list[int]:
    """Rows passed to each up-front reference computation."""
    calls: list[int] = []
    original = reference_cache.compute_reference_logps

    def counting(module, dataset, collator, batch_size):
        calls.append(len(dataset))
        return original(module, dataset, collator, batch_size)

    monkeypatch.setattr(reference_cache, "compute_reference_logps", counting)
    return calls


class RecordSteps(L.Callback):
    """Per training batch: the loss, and whether the batch carried precomputed reference log-probs."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.precomputed: list[bool] = []
        self.eval_precomputed: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.precomputed.append("reference_logps" in batch)

    def _eval(self, batch) -> None:
        self.eval_precomputed.append("reference_logps" in batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval(batch)


RECORD = "--trainer.callbacks=[" + json.dumps({"class_path": "test_reference_cache.RecordSteps"}) + "]"


def fit(tmp_path, model_dir, *extra, subcommand="fit") -> RecordSteps:
    cli = run_cli(tmp_path, model_dir, "--model.lora_dropout=0", "--data.batch_size=2", RECORD, *extra,
                  subcommand=subcommand)
    return next(c for c in cli.trainer.callbacks if isinstance(c, RecordSteps))


def cache_files(tmp_path) -> list:
    return sorted(tmp_path.rglob("reference_logps-*.pt"))


@pytest.mark.parametrize("settings", [(), ("--model.finetuning=full",), ("--model.quantization=nf4",)],
                         ids=["lora", "full", "nf4"])
def test_cached_reference_gives_the_same_losses_as_the_live_one(tmp_path, tiny_model_dir, computes, settings):
    if "--model.quantization=nf4" in settings:
        pytest.importorskip("bitsandbytes")
    write_pairs(tmp_path / "pairs.jsonl")
    live = fit(tmp_path, tiny_model_dir, "--trainer.max_steps=4", "--model.precompute_reference=false", *settings)
    assert computes == [] and not cache_files(tmp_path)  # the switch off: nothing computed, nothing written
    assert not any(live.precomputed) and not any(live.eval_precomputed)

    cached = fit(tmp_path, tiny_model_dir, "--trainer.max_steps=4", *settings)
    assert computes == [12, 4]  # train and val, once each
    assert all(cached.precomputed) and all(cached.eval_precomputed) and len(cache_files(tmp_path)) == 2
    assert cached.losses == pytest.approx(live.losses, abs=1e-5, rel=0)
    assert len(cached.losses) == 4 and max(cached.losses) != min(cached.losses)  # the policy did move


def test_second_run_and_resume_load_the_cache(tmp_path, tiny_model_dir, computes):
    write_pairs(tmp_path / "pairs.jsonl", n=20)
    stop = {"class_path": "test_training.StopAfterSteps", "init_args": {"steps": 2}}
    common = ("--trainer.max_epochs=2", "--checkpoint.every_n_train_steps=1")
    record = {"class_path": "test_reference_cache.RecordSteps"}
    first = run_cli(tmp_path, tiny_model_dir, *common, f"--trainer.callbacks=[{json.dumps(stop)}, {json.dumps(record)}]")
    assert computes == [15, 5] and first.trainer.global_step == 2
    assert all(next(c for c in first.trainer.callbacks if isinstance(c, RecordSteps)).precomputed)

    resumed = fit(tmp_path, tiny_model_dir, *common, "--ckpt_path=last")
    assert computes == [15, 5]  # no reference forward up front, and none per step either
    assert resumed.precomputed and all(resumed.precomputed) and all(resumed.eval_precomputed)

    fresh = fit(tmp_path, tiny_model_dir, "--trainer.max_steps=2")  # a new run on the same data and model
    assert computes == [15, 5] and all(fresh.precomputed)

    # test on the validation split (the default test data) reuses the fit's cache
    tested = fit(tmp_path, tiny_model_dir, "--ckpt_path=last", subcommand="test")
    assert tested.eval_precomputed and all(tested.eval_precomputed) and computes == [15, 5]


def test_changed_model_or_dataset_recomputes(tmp_path, tiny_model_dir, computes):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    write_pairs(tmp_path / "pairs.jsonl")
    args = ("--trainer.max_steps=1",)
    fit(tmp_path, str(model_dir), *args)
    fit(tmp_path, str(model_dir), *args)
    assert len(computes) == 2  # train + val once; the second run loaded both

    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # re-saved weights
    fit(tmp_path, str(model_dir), *args)
    assert len(computes) == 4

    write_pairs(tmp_path / "pairs.jsonl", n=20)  # other data
    fit(tmp_path, str(model_dir), *args)
    assert len(computes) == 6 and computes[-2:] == [15, 5]


def test_every_reference_setting_is_in_the_key(tmp_path, tiny_model_dir):
    base = DPOModule(model_name_or_path=tiny_model_dir).hparams
    digest = reference_cache.key_digest(reference_cache.cache_key("fp", base, "32-true"))
    assert digest == reference_cache.key_digest(reference_cache.cache_key("fp", base, "32-true"))  # stable

    def changed(**kwargs) -> str:
        hparams = {**base, **kwargs}
        return reference_cache.key_digest(reference_cache.cache_key(hparams.pop("fp", "fp"), _Hparams(hparams),
                                                                    hparams.pop("precision", "32-true")))

    adapter = tmp_path / "sft.ckpt"
    adapter.write_bytes(b"one")
    with_adapter = changed(init_adapter=str(adapter))
    others = [changed(fp="other"), changed(dtype="bfloat16"), changed(quantization="nf4"),
              changed(finetuning="full"), changed(attn_implementation="eager"), changed(precision="bf16-mixed"),
              with_adapter]
    assert len({digest, *others}) == len(others) + 1
    adapter.write_bytes(b"two")  # same path, retrained adapter
    assert changed(init_adapter=str(adapter)) != with_adapter
    # settings that do not touch the reference share the cache
    assert changed(beta=0.5, learning_rate=1.0, lora_r=4, loss_type="ipo") == digest


class _Hparams(dict):
    __getattr__ = dict.__getitem__


def test_shards_reassemble_in_dataset_order():
    rows = torch.arange(10.0).repeat(2, 1).T  # [10, 2], row i holds i
    for world in (1, 2, 3, 4, 16):
        shards = [rows[reference_cache.shard_indices(10, rank, world)] for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # equal counts keep all_gather in step
        assert torch.equal(reference_cache.unshard(torch.stack(shards), 10), rows)


def test_cache_file_for_another_key_or_size_is_a_miss(tmp_path):
    path = tmp_path / "reference_logps-x.pt"
    logps = torch.randn(3, 2)
    reference_cache.save(path, {"a": 1}, logps)
    assert torch.equal(reference_cache.load(path, {"a": 1}, 3), logps)
    assert reference_cache.load(path, {"a": 2}, 3) is None
    assert reference_cache.load(path, {"a": 1}, 4) is None
    path.write_bytes(b"damaged")
    assert reference_cache.load(path, {"a": 1}, 3) is None


def test_half_true_precision_keeps_the_live_reference():
    """bf16-true would cast the cached float32 values in every batch to bf16: warn and attach nothing."""
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import HalfPrecision

    trainer = SimpleNamespace(precision="bf16-true", precision_plugin=HalfPrecision("bf16-true"))
    reference = reference_cache.ReferenceLogps(SimpleNamespace(trainer=trainer))
    with pytest.warns(UserWarning, match="trainer.precision=bf16-true converts"):
        assert reference("train", "untouched rows", "fingerprint", collator=None, batch_size=1) is None
