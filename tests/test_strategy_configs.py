"""configs/strategies/*.yaml parse as a second --config over a main config, name Lightning's own strategies,
and comment every key (litgpt's config-hub test: parse every YAML, run nothing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from lit_dpo.cli import LitDPOCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STRATEGIES = {
    "ddp": ("lightning.pytorch.strategies.DDPStrategy", {}),
    "fsdp": ("lightning.pytorch.strategies.FSDPStrategy", {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}),
    "deepspeed_zero2": ("lightning.pytorch.strategies.DeepSpeedStrategy", {"stage": 2, "exclude_frozen_parameters": True}),
    "deepspeed_zero3": ("lightning.pytorch.strategies.DeepSpeedStrategy", {"stage": 3, "exclude_frozen_parameters": True}),
}


def test_every_strategy_file_is_listed():
    assert {p.stem for p in (CONFIGS / "strategies").glob("*.yaml")} == set(STRATEGIES)


def resolved_config(name: str, capsys) -> dict:
    """`fit --config configs/balanced.yaml --config configs/strategies/NAME.yaml --print_config`, parsed."""
    args = ["fit", "--config", str(CONFIGS / "balanced.yaml"), "--config", str(CONFIGS / "strategies" / f"{name}.yaml"),
            "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        LitDPOCLI(args=args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_config_parses_over_balanced(name, capsys):
    config = resolved_config(name, capsys)
    class_path, init_args = STRATEGIES[name]
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == class_path
    assert strategy["init_args"].items() >= init_args.items()
    assert config["trainer"]["devices"] == 2 and config["trainer"]["accelerator"] == "gpu"
    # the main config's settings survive the merge
    assert config["trainer"]["accumulate_grad_batches"] == 8 and config["model"]["beta"] == 0.1
    if name == "fsdp":
        assert strategy["init_args"]["auto_wrap_policy"] == ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]


def test_deepspeed_configs_parse_without_deepspeed_installed(capsys):
    """Parsing resolves Lightning's DeepSpeedStrategy signature only; deepspeed is imported when the
    strategy is built, so --print_config and these tests work on machines without it."""
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    for name in ("deepspeed_zero2", "deepspeed_zero3"):
        assert resolved_config(name, capsys)["trainer"]["strategy"]["init_args"]["stage"] == int(name[-1])
    assert "deepspeed" not in sys.modules


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_setting_has_a_comment(name):
    for number, line in enumerate((CONFIGS / "strategies" / f"{name}.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert " # " in line or line.rstrip().endswith("#"), f"{name}.yaml:{number} has no comment: {line}"


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_strategy_builds_from_its_file(name):
    """jsonargparse turns the YAML into Lightning's strategy object (no GPU needed to build it)."""
    from typing import Union

    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])
    section = yaml.safe_load((CONFIGS / "strategies" / f"{name}.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate_classes(parser.parse_args(["--strategy", yaml.safe_dump(section)])).strategy
    assert type(strategy).__name__ == STRATEGIES[name][0].rsplit(".", 1)[1]
    if name == "fsdp":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        assert LlamaDecoderLayer in strategy.kwargs["auto_wrap_policy"]._module_classes
        assert strategy.kwargs["use_orig_params"] is True  # LoRA: frozen and trainable weights share shards
