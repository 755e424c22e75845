"""`model.init_adapter`: DPO starts from an SFT adapter and uses it as the reference (S-DPO's recipe)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dpo.models.adapters import AdapterError
from lit_dpo.models.sources import ModelLoadError
from lit_dpo.module import DPOModule
from tests.test_module import make_batch, make_module


def _sft_checkpoint(model_dir, path, **kwargs):
    """A checkpoint as an SFT run writes it: trainable LoRA weights (made non-trivial) + hyper_parameters."""
    module = make_module(model_dir, loss_type="sft", **kwargs)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # fresh LoRA B is zero; an SFT run would have moved it
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.save({"state_dict": trainable, "hyper_parameters": dict(module.hparams)}, path)
    return module


def test_init_adapter_is_the_start_and_the_reference(tiny_model_dir, tiny_tokenizer, tmp_path):
    ckpt = tmp_path / "sft.ckpt"
    sft = _sft_checkpoint(tiny_model_dir, ckpt)
    batch = make_batch(tiny_tokenizer)
    with torch.no_grad():
        sft_logps, _ = sft.answer_logps(sft.policy, batch)

    dpo = make_module(tiny_model_dir, init_adapter=str(ckpt))
    with torch.no_grad():
        policy_logps, _ = dpo.answer_logps(dpo.policy, batch)
    torch.testing.assert_close(policy_logps, sft_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(dpo.reference_logps(batch), sft_logps, atol=1e-5, rtol=0)
    per_pair, _ = dpo.pair_losses(batch)  # policy == reference at the start: ln 2, as from the base
    torch.testing.assert_close(per_pair, torch.full_like(per_pair, math.log(2)), atol=1e-6, rtol=0)

    # only the `default` adapter trains; the reference adapter never changes
    trainable = [n for n, p in dpo.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    assert len(trainable) == sum(1 for _, p in sft.named_parameters() if p.requires_grad)
    reference_before = {n: p.clone() for n, p in dpo.named_parameters() if ".reference." in n}
    optimizer = torch.optim.SGD([p for p in dpo.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        loss, _ = dpo.pair_losses(batch)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, reference_before[n]) for n, p in dpo.named_parameters() if ".reference." in n)
    with torch.no_grad():
        assert not torch.allclose(dpo.answer_logps(dpo.policy, batch)[0], sft_logps, atol=1e-4)
    torch.testing.assert_close(dpo.reference_logps(batch), sft_logps, atol=1e-5, rtol=0)


def test_init_adapter_from_a_peft_directory(tiny_model_dir, tiny_tokenizer, tmp_path):
    sft = _sft_checkpoint(tiny_model_dir, tmp_path / "sft.ckpt")
    sft.policy.save_pretrained(tmp_path / "adapter")
    batch = make_batch(tiny_tokenizer)
    dpo = make_module(tiny_model_dir, init_adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(dpo.reference_logps(batch), sft.answer_logps(sft.policy, batch)[0], atol=1e-5, rtol=0)


def test_init_adapter_errors_name_the_key_and_the_fix(tiny_model_dir, tmp_path):
    with pytest.raises(AdapterError, match="model.init_adapter: not found"):
        DPOModule(model_name_or_path=tiny_model_dir, init_adapter=str(tmp_path / "missing.ckpt"))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(AdapterError, match="not a readable checkpoint"):
        DPOModule(model_name_or_path=tiny_model_dir, init_adapter=str(tmp_path / "junk.ckpt"))

    ckpt = tmp_path / "sft.ckpt"
    _sft_checkpoint(tiny_model_dir, ckpt, lora_r=4)
    module = DPOModule(model_name_or_path=tiny_model_dir, init_adapter=str(ckpt), lora_r=16)
    with pytest.raises(AdapterError, match="lora_r=4 but model.lora_r=16; set model.lora_r: 4"):
        module.configure_model()
    full = DPOModule(model_name_or_path=tiny_model_dir, init_adapter=str(ckpt), lora_r=4, finetuning="full")
    with pytest.raises(ModelLoadError, match="init_adapter needs model.finetuning: lora"):
        full.configure_model()
