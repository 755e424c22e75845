"""The answer-scoring forward: the full-logits oracle it is checked against, and the batch layout chosen
once, before the loaders exist, from the model's attention backend (never converted batch by batch)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_dpo.data.collate import PreferenceCollator
from lit_dpo.forward import takes_custom_mask
from tests.full_logits import sequence_logps
from tests.test_training import run_cli, write_pairs


def test_sequence_logps_matches_hand_loop_and_masks():
    g = torch.Generator().manual_seed(0)
    n, t, v = 3, 6, 11
    logits = torch.randn(n, t, v, generator=g)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, :] = -100  # nothing to score
    logps, counts = sequence_logps(logits, labels)

    expected_logps, expected_counts = torch.zeros(n), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        for pos in range(1, t):  # label at pos is predicted by the logits at pos - 1
            if labels[i, pos] != -100:
                expected_logps[i] += torch.log_softmax(logits[i, pos - 1], dim=-1)[labels[i, pos]]
                expected_counts[i] += 1
    assert_close(logps, expected_logps)
    assert torch.equal(counts, expected_counts)
    assert counts.tolist() == [3, 3, 0]  # first label is never scored (nothing predicts it)
    assert logps[2].item() == 0.0


def test_sequence_logps_upcasts_and_respects_ignore_index():
    logits = torch.randn(2, 5, 7).to(torch.bfloat16)
    labels = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, 5, 6, -1]])
    logps, counts = sequence_logps(logits, labels, ignore_index=-1)
    assert logps.dtype == torch.float32
    assert counts.tolist() == [4, 2]
    ref = torch.log_softmax(logits.float()[1], -1)
    assert_close(logps[1], ref[1, 5] + ref[2, 6])


@pytest.mark.parametrize(("backend", "shared"), [(None, True), ("sdpa", True), ("eager", True),
                                                 ("flash_attention_2", False), ("flex_attention", False)])
def test_which_backends_take_the_shared_layout(backend, shared):
    assert takes_custom_mask(backend) is shared


class RecordLayout(L.Callback):
    """Per training and validation batch: whether it came in the shared layout; the training losses."""

    def __init__(self) -> None:
        self.shared: list[bool] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.shared.append("answer_index" in batch)
        self.losses.append(outputs["loss"].item())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.shared.append("answer_index" in batch)


def test_a_backend_without_custom_masks_gets_plain_batches_from_the_start(tmp_path, tiny_model_dir, monkeypatch):
    import lit_dpo.cli as cli_file

    write_pairs(tmp_path / "pairs.jsonl")
    record = "--trainer.callbacks=[" + json.dumps({"class_path": "test_forward.RecordLayout"}) + "]"
    args = ("--trainer.max_steps=3", "--data.batch_size=2", "--model.lora_dropout=0", record)

    def layouts(cli) -> RecordLayout:
        return next(c for c in cli.trainer.callbacks if isinstance(c, RecordLayout))

    shared = layouts(run_cli(tmp_path, tiny_model_dir, *args))
    assert shared.shared and all(shared.shared)
    monkeypatch.setattr(cli_file, "takes_custom_mask", lambda backend: False)  # as for flash_attention_2
    with pytest.warns(UserWarning, match="plain layout") as warned:
        cli = run_cli(tmp_path, tiny_model_dir, *args)
    plain = layouts(cli)
    assert sum("plain layout" in str(w.message) for w in warned) == 1  # said once, at set-up
    assert plain.shared and not any(plain.shared)
    assert isinstance(cli.datamodule.collator, PreferenceCollator)
    assert plain.losses == pytest.approx(shared.losses, abs=1e-5, rel=0)
