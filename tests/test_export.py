"""Exporting a trained LoRA checkpoint as a plain HF model: same logits as the trained policy, no peft needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_dpo.errors import UserInputError
from lit_dpo.checkpoints import export_checkpoint
from lit_dpo.commands import main
from test_training import run_cli, write_pairs

SEQUENCES = [[1, 5, 9, 40, 77, 2], [3, 3, 100, 250, 12, 8], [1, 200, 300, 399, 0, 17]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One tiny LoRA run (lr high enough that B moves off 0) and its export."""
    tmp_path = tmp_path_factory.mktemp("export")
    write_pairs(tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=3", "--model.learning_rate=1e-2")
    ckpt = tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "merged")
    return cli.model.policy.eval(), ckpt, out


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(SEQUENCES)).logits


def test_merged_model_reproduces_the_trained_policy(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy, _, out = trained
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())  # a plain model, adapters folded in
    expected = logits(policy)  # the trained policy with its adapters on
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (logits(base) - expected).abs().max() > 1e-3  # training moved the model, so the merge mattered


def test_export_is_a_plain_directory_with_tokenizer(trained, tiny_tokenizer):
    from transformers import AutoTokenizer

    _, _, out = trained
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Star City (1994)"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_refuses_to_overwrite_unless_asked(trained, tmp_path):
    _, ckpt, _ = trained
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    with pytest.raises(UserInputError, match="--overwrite"):
        export_checkpoint(ckpt, out)
    export_checkpoint(ckpt, out, overwrite=True, dtype="bfloat16")
    assert not (out / "stale.safetensors").exists()  # replaced, not mixed with the old export
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_missing_or_mismatched_checkpoint_is_a_user_error(trained, tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")
    _, ckpt, _ = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key.replace("lora_A", "lora_Z")] = checkpoint["state_dict"].pop(key)
    renamed = tmp_path / "renamed.ckpt"
    torch.save(checkpoint, renamed)
    with pytest.raises(UserInputError, match="keys the model does not have"):
        export_checkpoint(renamed, tmp_path / "out")
    checkpoint["hyper_parameters"]["lora_r"] = 4  # the adapters no longer fit the model these settings build
    torch.save(checkpoint, renamed)
    with pytest.raises(UserInputError, match="size mismatch.*lora_r") as error:
        export_checkpoint(renamed, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_main_exit_codes(trained, tmp_path, capsys):
    _, ckpt, _ = trained
    assert main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lit_dpo: error: export --ckpt_path: not found") and err.count("\n") == 1
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "b")]) == 0
    assert str(tmp_path / "b") in capsys.readouterr().out and Path(tmp_path / "b" / "config.json").is_file()


def test_quantized_run_merges_into_unquantized_weights(trained, tmp_path, caplog):
    _, ckpt, out = trained
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["quantization"] = "nf4"
    quantized = tmp_path / "quantized.ckpt"
    torch.save(checkpoint, quantized)
    with caplog.at_level("WARNING", logger="lit_dpo.checkpoints"):
        export_checkpoint(quantized, tmp_path / "q")
    assert "quantization=nf4" in caplog.text
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_full_finetuning_checkpoint_exports_the_policy(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    write_pairs(tmp_path / "pairs.jsonl")
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=2", "--model.finetuning=full")
    out = export_checkpoint(tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt", tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = logits(cli.model.policy.eval())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (logits(base) - expected).abs().max() > 1e-3  # the trained weights were saved, not the base


def test_python_m_lit_dpo_export_dispatches(tmp_path, monkeypatch, capsys):
    import sys

    from lit_dpo.__main__ import main as package_main

    monkeypatch.setattr(sys, "argv", ["lit_dpo", "export", "--ckpt_path", str(tmp_path / "missing.ckpt"),
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        package_main()
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().startswith("lit_dpo: error:")
