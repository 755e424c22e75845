"""`lit_dpo.compat` against the installed libraries: each private name it uses exists and still does what
lit_dpo needs, and the reason it is needed still holds. A failure here after an upgrade says which
function to revisit, before any run goes wrong."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_dpo import compat

STEPS_PER_EPOCH = 8


class StopAndSave(L.Callback):
    """Stops mid-epoch after `step` optimizer steps, saving last.ckpt first (through compat, or not)."""

    def __init__(self, step: int, through_compat: bool) -> None:
        self.step, self.through_compat = step, through_compat

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.through_compat:
                compat.save_last_checkpoint(trainer.checkpoint_callback, trainer)
            else:
                trainer.save_checkpoint(f"{trainer.checkpoint_callback.dirpath}/last.ckpt")
            trainer.should_stop = True


def fit(tmp_path, *callbacks, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=100), *callbacks],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer


def test_model_checkpoint_private_names_exist_with_their_signatures():
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters) == ["self", "trainer", "monitor_candidates"]
    assert list(inspect.signature(ModelCheckpoint._monitor_candidates).parameters) == ["self", "trainer"]


def test_a_mid_epoch_last_checkpoint_survives_the_end_of_training_and_resumes_mid_epoch(tmp_path):
    fit(tmp_path, StopAndSave(3, through_compat=True))
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["last.ckpt"]  # no last-v1.ckpt beside it
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed = fit(tmp_path / "resumed", ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.global_step == 2 * STEPS_PER_EPOCH  # the rest of the interrupted epoch, then the second


def test_why_compat_is_needed_trainer_save_checkpoint_alone_is_saved_over(tmp_path):
    """If this fails, ModelCheckpoint no longer saves a "last" checkpoint of its own at train end after a
    guard saved one mid-epoch: then `compat.save_last_checkpoint` can become a plain `trainer.save_checkpoint`."""
    fit(tmp_path, StopAndSave(3, through_compat=False))
    own = [p for p in (tmp_path / "checkpoints").iterdir() if p.name != "last.ckpt"]
    assert [p.name for p in own] == ["last-v1.ckpt"]  # over last.ckpt itself with enable_version_counter=False
    resumed = fit(tmp_path / "resumed", ckpt_path=own[0])
    assert resumed.global_step < 2 * STEPS_PER_EPOCH  # its loop state skips the rest of the interrupted epoch


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_attention_implementation_reads_the_backend_that_runs(tiny_model_dir, backend):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=backend)
    assert hasattr(model.config, "_attn_implementation")
    assert compat.attention_implementation(model) == backend
    default = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # transformers picks one itself
    assert compat.attention_implementation(default) in ("sdpa", "eager")


def test_without_the_private_method_the_state_is_still_saved(tmp_path, monkeypatch):
    monkeypatch.delattr(ModelCheckpoint, "_save_last_checkpoint")
    monkeypatch.setattr(ModelCheckpoint, "on_train_end", lambda *args: None)  # it calls the deleted method
    fit(tmp_path, StopAndSave(3, through_compat=True))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
