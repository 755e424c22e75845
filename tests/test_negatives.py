"""K rejected answers per prompt (S-DPO): validation, tokenization stats, batching, and training through the CLI."""

from __future__ import annotations

import json

import datasets
import pytest

from lit_dpo.data.loading import DataError
from lit_dpo.errors import ConfigError
from test_data import make_dm, write_lines
from test_training import run_cli


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_DPO_CACHE", str(tmp_path / "lit_dpo_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def k_records(n: int, k: int = 3) -> list[dict]:
    negatives = ["the last road", "a dark star of the long night", "the queen", "king"]
    return [
        {"id": i, "prompt": f"which movie is next {i} ?", "chosen": "the dark river", "rejected": negatives[:k]}
        for i in range(n)
    ]


def write_records(path, records: list[dict]) -> str:
    return write_lines(path, [json.dumps(r) for r in records])


def test_k_negatives_tokenize_with_right_stats_and_batch(tmp_path, tiny_model_dir, tiny_tokenizer):
    records = k_records(8)
    records[2]["rejected"] = ["the last road", "the dark river", "king"]  # chosen repeated among the negatives
    path = write_records(tmp_path / "k.jsonl", records)
    dm = make_dm(tiny_model_dir, path, val_path=path, batch_size=2)
    assert dm.negatives == {f"data.train_path {path}": 3, f"data.val_path {path}": 3}
    eos = tiny_tokenizer.eos_token_id
    row = dm.train_dataset[0]
    ids = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]  # noqa: E731
    assert row["rejected_input_ids"] == [ids(t) for t in k_records(1)[0]["rejected"]]
    longest = max(len(ids("the dark river")), *(len(ids(t)) for t in k_records(1)[0]["rejected"]))
    assert dm.stats["train"]["completion_tokens_max"] == longest  # the long second negative counts
    assert dm.stats["train"]["identical_pairs"] == 1

    shared = next(iter(dm.val_dataloader()))
    assert shared["prompt_count"] == 2 and shared["input_ids"].shape[0] == 2 and int(shared["answer_index"].max()) == 3
    dm.prefix_sharing = False
    plain = next(iter(dm.val_dataloader()))
    assert plain["prompt_count"] == 2 and plain["input_ids"].shape[0] == 8  # 2 prompts × (1 chosen + 3 rejected)


@pytest.mark.parametrize(
    ("row_value", "problem"),
    [
        (["the last road", "the queen"], "'rejected' holds a list of 2 but row 1 holds a list of 3"),
        ("the last road", "'rejected' holds one string but row 1 holds a list of 3"),
        ([], "'rejected' is an empty list"),
        (["the last road", " ", "king"], "'rejected'[1] is empty"),
        (["the last road", 7, "king"], "'rejected'[1] is not a string (got int)"),
    ],
)
def test_bad_negative_lists_name_file_and_row(row_value, problem, tmp_path, tiny_model_dir):
    records = k_records(6)
    records[3]["rejected"] = row_value
    path = write_records(tmp_path / "k.jsonl", records)
    with pytest.raises(DataError) as err:
        make_dm(tiny_model_dir, path)
    assert f"data.train_path: {path} row 4: {problem}" in str(err.value)
    assert "\n" not in str(err.value)


def test_rows_with_another_k_are_skipped_and_counted(tmp_path, tiny_model_dir):
    records = k_records(10)
    records[5]["rejected"] = ["the queen"]
    path = write_records(tmp_path / "k.jsonl", records)
    dm = make_dm(tiny_model_dir, path, val_path=path, skip_invalid_rows=True)
    assert dm.stats["train"]["skipped_invalid"] == 1 and 5 not in dm.train_dataset["id"]


def test_parquet_with_k_negatives(tmp_path, tiny_model_dir):
    path = str(tmp_path / "k.parquet")
    datasets.Dataset.from_list(k_records(8, k=2)).to_parquet(path)
    dm = make_dm(tiny_model_dir, path, val_path=path)
    assert len(dm.train_dataset[0]["rejected_input_ids"]) == 2 and dm.negatives[f"data.train_path {path}"] == 2


def test_cli_refuses_k_negatives_without_sdpo(tmp_path, tiny_model_dir):
    write_records(tmp_path / "pairs.jsonl", k_records(8))
    with pytest.raises(ConfigError, match=r"model.loss_type: 'sigmoid' .* data.train_path .*pairs.jsonl has 3; use model.loss_type: sdpo"):
        run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=1")


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_cli_trains_sdpo_with_three_negatives(tmp_path, tiny_model_dir, prefix_sharing):
    write_records(tmp_path / "pairs.jsonl", k_records(8))
    cli = run_cli(
        tmp_path, tiny_model_dir, "--model.loss_type=sdpo", "--data.batch_size=2", "--trainer.max_steps=3",
        f"--data.prefix_sharing={str(prefix_sharing).lower()}",
    )
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert "val/loss" in metrics and bool(metrics["train/loss"].isfinite())
    lora_b = [p for n, p in cli.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # it trained
