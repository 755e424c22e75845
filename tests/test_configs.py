"""Every YAML in configs/ parses against the real CLI and carries the guide's values (litgpt's config-hub test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_dpo.cli import LitDPOCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# ../shared/seeds/000_c39a5146b2c70498.txt, EXAMPLE CONFIGURATIONS
GUIDE = {
    "aggressive": dict(beta=0.2, learning_rate=1e-4, max_epochs=5, accumulate=8, warmup=10),
    "balanced": dict(beta=0.1, learning_rate=5e-5, max_epochs=3, accumulate=8, warmup=5),
    "conservative": dict(beta=0.05, learning_rate=2e-5, max_epochs=5, accumulate=8, warmup=20),
    "quantization_optimized": dict(beta=0.1, learning_rate=3e-5, max_epochs=4, accumulate=8, warmup=10),
    "quick_experiment": dict(beta=0.1, learning_rate=1e-4, max_epochs=1, accumulate=4, warmup=2),
}


def resolved_config(path: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        LitDPOCLI(args=["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_all_expected_configs_exist():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(GUIDE) | {"sft"}


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_guide_configs_carry_the_guide_values(name, capsys):
    config = resolved_config(CONFIGS / f"{name}.yaml", capsys)
    expected = GUIDE[name]
    assert config["model"]["beta"] == expected["beta"]
    assert config["model"]["learning_rate"] == pytest.approx(expected["learning_rate"])
    assert config["model"]["warmup_steps"] == expected["warmup"]
    assert config["trainer"]["max_epochs"] == expected["max_epochs"]
    assert config["trainer"]["accumulate_grad_batches"] == expected["accumulate"]
    assert config["data"]["batch_size"] == 1
    assert config["data"]["max_prompt_length"] == 512
    assert isinstance(config["seed_everything"], int)
    assert config["model"]["model_name_or_path"] == "embedded:smollm2-135m-instruct"
    assert config["trainer"]["logger"]["init_args"]["name"] == name


def test_sft_config_is_balanced_with_the_sft_loss(capsys):
    sft, balanced = resolved_config(CONFIGS / "sft.yaml", capsys), resolved_config(CONFIGS / "balanced.yaml", capsys)
    assert sft["model"]["loss_type"] == "sft"
    assert sft["data"] == balanced["data"]
    for key in ("max_epochs", "accumulate_grad_batches"):
        assert sft["trainer"][key] == balanced["trainer"][key]
    assert sft["model"]["warmup_steps"] == balanced["model"]["warmup_steps"]


def test_quantization_optimized_uses_4bit(capsys):
    assert resolved_config(CONFIGS / "quantization_optimized.yaml", capsys)["model"]["quantization"] == "nf4"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_key_carries_a_comment(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # comments, blank lines and section headers
        if stripped.startswith("class_path:"):
            continue
        assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def test_dotted_overrides_and_multiple_configs(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  beta: 0.3\n")
    with pytest.raises(SystemExit):
        LitDPOCLI(args=["fit", "--config", str(CONFIGS / "balanced.yaml"), "--config", str(extra),
                        "--model.learning_rate", "1e-5", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["beta"] == 0.3 and config["model"]["learning_rate"] == pytest.approx(1e-5)


@pytest.mark.parametrize("name", sorted(GUIDE) + ["sft"])
def test_guide_watchers_are_on_with_the_guide_thresholds(name, capsys):
    config = resolved_config(CONFIGS / f"{name}.yaml", capsys)
    assert config["plateau"]["monitor"] == "val/loss" and config["plateau"]["min_epochs"] == 2
    assert config["oscillation"]["action"] == "reduce_lr" and config["oscillation"]["factor"] == 0.5
    assert config["divergence"]["keep_last_good"] is True
    assert config["memory"]["soft_limit"] == 0.9
    assert config["diagnosis"]["filename"] == "diagnosis.md"
