"""Tests for lit_dpo.data: synthetic set, collator, file loading/validation, tokenization, truncation, caching."""

from __future__ import annotations

import csv
import json
import random
import re

import datasets
import pytest
import torch

import lit_dpo.data.tokenize as tokenize_module
from lit_dpo.data import DataError, PreferenceCollator, PreferenceDataModule, generate_pairs
from lit_dpo.data.tokenize import fit_prompt
from lit_dpo.data.synthetic import GENRE_KEYWORDS, build_catalogue
from lit_dpo.files import write_jsonl


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Keep the synthetic file, cleaned copies and datasets' Arrow cache inside the test's tmp dir."""
    monkeypatch.setenv("LIT_DPO_CACHE", str(tmp_path / "lit_dpo_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def pairs(n: int, prefix: str = "row") -> list[dict]:
    """Short, distinct preference records (few tokens with the tiny tokenizer)."""
    return [
        {
            "id": i,
            "prompt": f"which movie is next {prefix} {i} ?",
            "chosen": "the dark river",
            "rejected": "the last road",
            "candidates": ["the dark river", "the last road"],
            "target": "the dark river",
        }
        for i in range(n)
    ]


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_csv(path, records: list[dict], fields=("id", "prompt", "chosen", "rejected")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return str(path)


def make_dm(tiny_model_dir, train_path, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_path=train_path, tokenizer_name_or_path=tiny_model_dir, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic():
    assert generate_pairs(20, seed=3) == generate_pairs(20, seed=3)
    assert generate_pairs(20, seed=3) != generate_pairs(20, seed=4)
    assert generate_pairs(5, seed=3) == generate_pairs(20, seed=3)[:5]


def test_synthetic_invariants():
    records = generate_pairs(50, seed=1, history_len=10, num_candidates=10)
    genre_of = {movie.label: movie.genre for movie in build_catalogue(random.Random(1))}
    for record in records:
        assert set(record) == {"prompt", "chosen", "rejected", "candidates", "target"}
        assert record["chosen"] == record["target"]
        assert len(record["candidates"]) == len(set(record["candidates"])) == 10
        assert record["target"] in record["candidates"]
        assert record["rejected"] in record["candidates"] and record["rejected"] != record["chosen"]
        history = re.search(r"in this order: (.*)\. Which movie", record["prompt"]).group(1)
        assert len(re.findall(r"\(\d{4}, [A-Za-z ]+\)", history)) == 10
        for label in record["candidates"]:
            title = label.rsplit(" (", 1)[0]
            assert f"{title} (" not in history  # no candidate was already watched
            assert label in record["prompt"]
        # The target's genre is a favourite: no other candidate shares it.
        target_genre = genre_of[record["target"]]
        assert [genre_of[c] for c in record["candidates"]].count(target_genre) == 1
    # Every title carries a keyword of its genre, which is what makes candidates' genres learnable.
    for label, genre in genre_of.items():
        assert any(keyword in label for keyword in GENRE_KEYWORDS[genre])
    assert len(genre_of) == 300


def test_synthetic_rejects_impossible_settings():
    with pytest.raises(ValueError, match="history_len"):
        generate_pairs(1, history_len=30)
    with pytest.raises(ValueError, match="num_candidates"):
        generate_pairs(1, num_candidates=1)


def test_write_jsonl_round_trip(tmp_path):
    records = generate_pairs(3)
    path = write_jsonl(records, tmp_path / "sub" / "s.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


# ---------------------------------------------------------------- collate


def test_collator_hand_checked_batch():
    rows = [
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [3, 9], "rejected_input_ids": [4, 5, 9],
         "target": "a", "prompt": "text is not passed on"},
        {"prompt_input_ids": [6], "chosen_input_ids": [7, 9], "rejected_input_ids": [8, 9],
         "target": "b", "prompt": "text is not passed on"},
    ]  # fmt: skip
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_count", "target"}
    # Rows 0-1: prompt + chosen; rows 2-3: prompt + rejected; right-padded to the longest (5).
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 0], [6, 7, 9, 0, 0], [1, 2, 4, 5, 9], [6, 8, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    x = -100
    assert batch["labels"].tolist() == [[x, x, 3, 9, x], [x, 7, 9, x, x], [x, x, 4, 5, 9], [x, 8, 9, x, x]]
    assert all(t.dtype == torch.long for t in (batch["input_ids"], batch["attention_mask"], batch["labels"]))
    assert batch["target"] == ["a", "b"]


# ---------------------------------------------------------------- formats and splits


def _write_source(kind: str, tmp_path, records: list[dict]) -> str:
    if kind == "jsonl":
        return write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
        return str(tmp_path / "d.json")
    if kind == "csv":
        return write_csv(tmp_path / "d.csv", records)
    if kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_formats_load_tokenize_and_batch(kind, tmp_path, tiny_model_dir, tiny_tokenizer):
    dm = make_dm(tiny_model_dir, _write_source(kind, tmp_path, pairs(20)), batch_size=4, val_fraction=0.25)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (15, 5)
    assert dm.test_dataset is dm.val_dataset
    assert dm.stats["train"]["pairs"] == 15 and dm.stats["val"]["pairs"] == 5
    row = dm.train_dataset[0]
    assert {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "id"} <= set(row)
    assert not {"prompt", "chosen", "rejected"} & set(row)
    eos = tiny_tokenizer.eos_token_id
    assert row["chosen_input_ids"] == tiny_tokenizer("the dark river", add_special_tokens=False)["input_ids"] + [eos]
    batch = next(iter(dm.train_dataloader()))
    # the shared-prompt layout (the default): one row per pair
    assert batch["input_ids"].shape[0] == 4 and batch["prompt_count"] == 4 and len(batch["id"]) == 4


def test_saved_datasetdict_uses_train_and_validation(tmp_path, tiny_model_dir):
    path = str(tmp_path / "dd")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs(6)), "validation": datasets.Dataset.from_list(pairs(3, "val"))}
    ).save_to_disk(path)
    dm = make_dm(tiny_model_dir, path)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (6, 3)


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path, tiny_model_dir):
    path = _write_source("jsonl", tmp_path, pairs(40))
    first, again = make_dm(tiny_model_dir, path, seed=1), make_dm(tiny_model_dir, path, seed=1)
    other = make_dm(tiny_model_dir, path, seed=2)
    train_ids, val_ids = set(first.train_dataset["id"]), set(first.val_dataset["id"])
    assert not train_ids & val_ids and train_ids | val_ids == set(range(40)) and len(val_ids) == 4
    assert again.val_dataset["id"] == first.val_dataset["id"]
    assert set(other.val_dataset["id"]) != val_ids


def test_val_path_and_test_path(tmp_path, tiny_model_dir):
    train = _write_source("jsonl", tmp_path, pairs(10))
    val = write_lines(tmp_path / "v.jsonl", [json.dumps(r) for r in pairs(3, "val")])
    test = write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in pairs(2, "test")])
    dm = make_dm(tiny_model_dir, train, val_path=val, test_path=test)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (10, 3, 2)
    assert dm.stats["test"]["pairs"] == 2


def test_custom_column_names(tmp_path, tiny_model_dir):
    records = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in pairs(8)]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in records])
    dm = make_dm(tiny_model_dir, path, prompt_column="question", chosen_column="good", rejected_column="bad")
    assert set(dm.train_dataset.column_names) == {"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}


def test_dataloaders_shuffle_train_by_seed_and_keep_eval_order(tmp_path, tiny_model_dir):
    path = _write_source("jsonl", tmp_path, pairs(30))
    a, b = make_dm(tiny_model_dir, path, batch_size=5), make_dm(tiny_model_dir, path, batch_size=5)
    order_a = [i for batch in a.train_dataloader() for i in batch["id"]]
    assert order_a == [i for batch in b.train_dataloader() for i in batch["id"]]
    assert order_a != a.train_dataset["id"]
    assert [i for batch in a.val_dataloader() for i in batch["id"]] == a.val_dataset["id"]


def test_default_is_cached_synthetic_set(tmp_path, tiny_model_dir):
    dm = make_dm(tiny_model_dir, None, synthetic_num_pairs=10, max_prompt_length=64, max_length=128)
    files = list((tmp_path / "lit_dpo_cache" / "synthetic").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 10
    assert len(dm.train_dataset) + len(dm.val_dataset) == 10
    assert set(dm.train_dataset.column_names) >= {"candidates", "target"}
    first = dm.train_dataset
    dm.setup("validate")  # idempotent
    assert dm.train_dataset is first


# ---------------------------------------------------------------- chat template and truncation


def test_chat_template_wraps_prompt(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = _write_source("jsonl", tmp_path, pairs(6))
    decoded = tiny_tokenizer.decode(make_dm(tiny_model_dir, path).train_dataset[0]["prompt_input_ids"])
    assert decoded.startswith("<|im_start|>user\nwhich movie") and decoded.endswith("<|im_start|>assistant\n")
    plain = make_dm(tiny_model_dir, path, use_chat_template=False).train_dataset[0]["prompt_input_ids"]
    assert tiny_tokenizer.decode(plain).startswith("which movie")


def test_fit_prompt_rules():
    prompt = list(range(10))
    assert fit_prompt(prompt, 3, max_prompt_length=4, max_length=100) == [6, 7, 8, 9]  # prompt cap
    assert fit_prompt(prompt, 97, max_prompt_length=8, max_length=100) == [7, 8, 9]  # pair cap
    assert fit_prompt(prompt, 99, max_prompt_length=8, max_length=100) == [9]  # keeps >= 1 prompt token
    assert fit_prompt(prompt, 100, max_prompt_length=8, max_length=100) is None  # cannot fit: drop
    assert fit_prompt(prompt, 3, max_prompt_length=50, max_length=100) == prompt


def test_long_prompt_is_left_truncated_completion_intact(tmp_path, tiny_model_dir, tiny_tokenizer):
    long = {"prompt": " ".join(["history"] * 100) + " which movie next ?", "chosen": "the dark river",
            "rejected": "the last road"}  # fmt: skip
    path = write_lines(tmp_path / "l.jsonl", [json.dumps(long)] * 4)
    dm = make_dm(tiny_model_dir, path, val_path=path, max_prompt_length=12, max_length=64)
    row = dm.train_dataset[0]
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": long["prompt"]}], add_generation_prompt=True,
                                              tokenize=False)  # fmt: skip
    full = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert row["prompt_input_ids"] == full[-12:]  # keeps the end: question + assistant header
    expected = tiny_tokenizer("the dark river", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert row["chosen_input_ids"] == expected
    assert dm.stats["train"]["truncated_prompts"] == 4 and dm.stats["train"]["prompt_tokens_max"] == 12
    # A tighter max_length cuts the prompt further so prompt + longer completion fits exactly.
    longest = max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
    tight = make_dm(tiny_model_dir, path, val_path=path, max_prompt_length=10, max_length=longest + 5)
    assert tight.train_dataset[0]["prompt_input_ids"] == full[-5:]


def test_pair_that_cannot_fit_is_dropped_and_counted(tmp_path, tiny_model_dir):
    records = pairs(5)
    records[2]["chosen"] = " ".join(["movie"] * 40)
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    dm = make_dm(tiny_model_dir, path, val_path=path, max_prompt_length=8, max_length=30)
    assert dm.stats["train"]["dropped_too_long"] == 1 and len(dm.train_dataset) == 4
    assert 2 not in dm.train_dataset["id"]
    assert all(len(r["chosen_input_ids"]) > 0 and len(r["prompt_input_ids"]) > 0 for r in dm.train_dataset)


def test_all_pairs_dropped_raises(tmp_path, tiny_model_dir):
    records = [{"prompt": "p", "chosen": " ".join(["movie"] * 40), "rejected": "r"}] * 3
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    with pytest.raises(DataError, match=r"data.train_path: all 3 train pairs were dropped.*data.max_length"):
        make_dm(tiny_model_dir, path, val_path=path, max_prompt_length=8, max_length=30)


def test_identical_pairs_are_allowed_and_counted(tmp_path, tiny_model_dir):
    records = pairs(4)
    records[0]["rejected"] = records[0]["chosen"]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    with pytest.warns(UserWarning, match="chosen == rejected"):
        dm = make_dm(tiny_model_dir, path, val_path=path)
    assert dm.stats["train"]["identical_pairs"] == 1


# ---------------------------------------------------------------- bad input


def test_bad_paths_fail_in_init(tmp_path, tiny_model_dir):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data.train_path: file not found: {re.escape(str(missing))}"):
        PreferenceDataModule(train_path=str(missing))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"data.val_path: unsupported file type '.txt'"):
        PreferenceDataModule(train_path=None, val_path=str(tmp_path / "d.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="data.test_path: .*not a dataset saved with save_to_disk"):
        PreferenceDataModule(test_path=str(tmp_path / "empty_dir"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.0}, "data.val_fraction must be in"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in"),
        ({"batch_size": 0}, "data.batch_size must be >= 1"),
        ({"max_prompt_length": 1024, "max_length": 1024}, "data.max_prompt_length .* must be smaller"),
        ({"chosen_column": "prompt"}, "three different columns"),
        ({"synthetic_history_len": 40}, "history_len"),
    ],
)
def test_bad_settings_fail_in_init(kwargs, message):
    with pytest.raises(DataError, match=message):
        PreferenceDataModule(**kwargs)


def test_malformed_jsonl_line(tmp_path, tiny_model_dir):
    good = json.dumps(pairs(1)[0])
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, '{"prompt": "a" "chosen": "b"}', good])
    with pytest.raises(DataError) as err:
        make_dm(tiny_model_dir, path)
    assert f"data.train_path: {path} line 4: invalid JSON (Expecting ',' delimiter); fix or remove" in str(err.value)


def test_missing_column(tmp_path, tiny_model_dir):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"prompt": "p", "answer": "a", "rejected": "r"})] * 3)
    with pytest.raises(DataError) as err:
        make_dm(tiny_model_dir, path)
    assert "missing column 'chosen' (found: prompt, answer, rejected); rename it or set data.chosen_column" in str(
        err.value
    )
    assert path in str(err.value)


@pytest.mark.parametrize(
    ("kind", "field", "value", "problem"),
    [
        ("jsonl", "chosen", "", "'chosen' is empty"),
        ("jsonl", "prompt", "   ", "'prompt' is empty"),
        ("jsonl", "rejected", 5, "'rejected' is not a string (got int)"),
        ("jsonl", "chosen", None, "'chosen' is missing or null"),
        ("csv", "chosen", "", "'chosen' is empty"),
        ("parquet", "rejected", None, "'rejected' is missing or null"),
    ],
)
def test_invalid_row_names_file_and_row(kind, field, value, problem, tmp_path, tiny_model_dir):
    records = pairs(6)
    records[4][field] = value
    path = _write_source(kind, tmp_path, records)
    with pytest.raises(DataError) as err:
        make_dm(tiny_model_dir, path)
    assert f"{path} row 5: {problem}" in str(err.value)
    assert "data.skip_invalid_rows: true" in str(err.value)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_skip_invalid_rows_skips_and_counts(kind, tmp_path, tiny_model_dir):
    records = pairs(10)
    records[1]["chosen"] = ""
    records[7]["rejected"] = 3 if kind == "jsonl" else None  # a number makes plain `datasets` loading fail
    path = _write_source(kind, tmp_path, records)
    dm = make_dm(tiny_model_dir, path, val_path=path, skip_invalid_rows=True)
    assert dm.stats["train"]["skipped_invalid"] == 2 and len(dm.train_dataset) == 8
    assert not {1, 7} & set(dm.train_dataset["id"])


def test_empty_file_and_all_invalid(tmp_path, tiny_model_dir):
    empty = write_lines(tmp_path / "e.jsonl", [""])
    with pytest.raises(DataError, match="has no rows"):
        make_dm(tiny_model_dir, empty)
    bad = write_lines(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "chosen": "", "rejected": "r"})] * 2)
    with pytest.raises(DataError, match="all 2 rows are invalid"):
        make_dm(tiny_model_dir, bad, skip_invalid_rows=True)


# ---------------------------------------------------------------- tokenization cache


def test_second_setup_reads_tokenization_cache(tmp_path, tiny_model_dir, monkeypatch):
    path = _write_source("jsonl", tmp_path, pairs(12))
    first = make_dm(tiny_model_dir, path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenization ran again instead of reading the cache")

    monkeypatch.setattr(tokenize_module, "tokenize_batch", must_not_run)
    second = make_dm(tiny_model_dir, path)
    assert second.train_dataset.cache_files == first.train_dataset.cache_files
    assert second.train_dataset["prompt_input_ids"] == first.train_dataset["prompt_input_ids"]
    # Different settings must not reuse the cached result.
    with pytest.raises(AssertionError, match="tokenization ran again"):
        make_dm(tiny_model_dir, path, max_prompt_length=7)
