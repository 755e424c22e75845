"""MovieLens builder: format detection, leave-one-out by time, candidate invariants, determinism, bad input.

The fixtures are tiny look-alikes written into tmp_path: MovieLens itself may not be redistributed.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from lit_dpo.data.loading import DataError
from lit_dpo.commands import main
from lit_dpo.data.movielens import prepare_movielens

NUM_MOVIES = 30
GENRES_1M = "Drama|Comedy"
# user -> movie ids rated 5, in chronological order. Users 4 and 5 are short of min_history + 3 = 6.
LIKED = {
    1: [12, 3, 27, 8, 19, 1, 22, 15],
    2: [5, 30, 14, 9, 2, 21, 17],
    3: [7, 26, 11, 4, 29, 18],
    4: [6, 13, 24, 10, 16],
    5: [20, 25],
}
# user -> movie ids rated 2, watched after everything above: never a target at min_rating 4.
DISLIKED = {1: [23, 28], 2: [6], 3: [13]}


def title(movie_id: int) -> str:
    return f"Movie {movie_id:02d} ({1950 + movie_id})"  # zero-padded so no title is a prefix of another


def rating_rows() -> list[tuple[int, int, int, int]]:
    """(user, movie, rating, timestamp), shuffled so file order is not chronological."""
    rows = []
    for user, movies in LIKED.items():
        later = DISLIKED.get(user, [])
        for step, movie in enumerate(movies + later):
            rows.append((user, movie, 5 if step < len(movies) else 2, 1000 * user + 10 * step))
    random.Random(1).shuffle(rows)
    return rows


def write_ml1m(folder, rows=None, movies_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    rows = rating_rows() if rows is None else rows
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows), encoding="latin-1")
    if movies_text is None:
        movies_text = "".join(f"{i}::{title(i)}::{GENRES_1M}\n" for i in range(1, NUM_MOVIES + 1))
    (folder / "movies.dat").write_text(movies_text, encoding="latin-1")
    (folder / "users.dat").write_text("1::F::1::10::48067\n", encoding="latin-1")
    return folder


def write_ml100k(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = rating_rows()
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in rows), encoding="latin-1")
    flags = "|".join("1" if g in (8, 5) else "0" for g in range(19))  # flag order puts Comedy before Drama
    items = "".join(f"{i}|{title(i)}|01-Jan-1995||http://x|{flags}\n" for i in range(1, NUM_MOVIES + 1))
    (folder / "u.item").write_text(items, encoding="latin-1")
    return folder


def read_split(out, split):
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def history_titles(prompt: str) -> list[str]:
    watched = prompt.split("in this order: ", 1)[1].split(". Which movie", 1)[0]
    return re.findall(r"Movie \d\d \(\d{4}\)", watched)


@pytest.fixture
def ml1m(tmp_path):
    return write_ml1m(tmp_path / "ml-1m")


def prepare(source, out, **kwargs):
    kwargs.setdefault("num_candidates", 8)
    return prepare_movielens(source, out, **kwargs)


@pytest.mark.parametrize(
    "writer, name, genres", [(write_ml1m, "ML-1M", "[Drama, Comedy]"), (write_ml100k, "ML-100K", "[Comedy, Drama]")]
)
def test_detects_format_and_counts(tmp_path, writer, name, genres):
    stats = prepare(writer(tmp_path / "src"), tmp_path / "out")
    assert stats["format"] == name
    assert stats["items"] == NUM_MOVIES
    assert stats["ratings"] == len(rating_rows())
    assert stats["positive_ratings"] == sum(map(len, LIKED.values()))
    assert (stats["users_kept"], stats["users_dropped"]) == (3, 2)
    assert stats["examples"] == {"train": 3, "val": 3, "test": 3}
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    assert genres in read_split(tmp_path / "out", "test")[0]["prompt"]


def test_leave_one_out_by_time(ml1m, tmp_path):
    out = tmp_path / "out"
    prepare(ml1m, out, history_len=50)
    by_split = {s: {r["user_id"]: r for r in read_split(out, s)} for s in ("train", "val", "test")}
    assert set(by_split["test"]) == {1, 2, 3}
    for user in (1, 2, 3):
        liked = LIKED[user]
        for split, position in (("train", -3), ("val", -2), ("test", -1)):
            record = by_split[split][user]
            assert record["target"] == record["chosen"] == title(liked[position])
            # The history is exactly the earlier positives, oldest first: no future leaks into it.
            assert history_titles(record["prompt"]) == [title(m) for m in liked[:position]]
        test_target = by_split["test"][user]["target"]
        assert test_target not in (by_split["train"][user]["target"], by_split["val"][user]["target"])
        assert test_target not in history_titles(by_split["val"][user]["prompt"])


def test_history_len_drops_oldest_first(ml1m, tmp_path):
    prepare(ml1m, tmp_path / "out", history_len=2)
    for record in read_split(tmp_path / "out", "test"):
        liked = LIKED[record["user_id"]]
        assert history_titles(record["prompt"]) == [title(m) for m in liked[-3:-1]]


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_candidates_and_rejected(ml1m, tmp_path, num_negatives):
    prepare(ml1m, tmp_path / "out", num_candidates=8, num_negatives=num_negatives)
    for split in ("train", "val", "test"):
        for record in read_split(tmp_path / "out", split):
            candidates = record["candidates"]
            assert len(candidates) == len(set(candidates)) == 8
            assert candidates.count(record["target"]) == 1
            listed = record["prompt"].split("Candidates: ", 1)[1].split("\n", 1)[0]
            assert listed.split(", ") == candidates  # the prompt shows every candidate, in order
            rejected = record["rejected"]
            rejected = [rejected] if num_negatives == 1 else rejected
            assert isinstance(record["rejected"], str if num_negatives == 1 else list)
            assert len(set(rejected)) == num_negatives
            assert all(r in candidates and r != record["chosen"] for r in rejected)
            # Negatives come from movies this user never rated positively.
            liked_titles = {title(m) for m in LIKED[record["user_id"]]}
            assert not (set(candidates) - {record["target"]}) & liked_titles


def test_min_rating(ml1m, tmp_path):
    low = {title(m) for movies in DISLIKED.values() for m in movies}
    prepare(ml1m, tmp_path / "a")
    assert all(r["target"] not in low for s in ("train", "val", "test") for r in read_split(tmp_path / "a", s))
    # At min_rating 2 the disliked movies, watched last, become the test targets.
    stats = prepare(ml1m, tmp_path / "b", min_rating=2)
    assert stats["positive_ratings"] == len(rating_rows())
    tests = {r["user_id"]: r["target"] for r in read_split(tmp_path / "b", "test")}
    assert tests[1] == title(DISLIKED[1][-1])


def test_sliding_windows(ml1m, tmp_path):
    stats = prepare(ml1m, tmp_path / "out", sliding_windows=True, min_history=3)
    # Positions min_history .. n-3 for each kept user.
    assert stats["examples"]["train"] == sum(len(LIKED[u]) - 2 - 3 for u in (1, 2, 3))
    for record in read_split(tmp_path / "out", "train"):
        liked = [title(m) for m in LIKED[record["user_id"]]]
        position = liked.index(record["target"])
        assert 3 <= position <= len(liked) - 3
        assert history_titles(record["prompt"]) == liked[:position]


def test_deterministic_by_seed(ml1m, tmp_path):
    prepare(ml1m, tmp_path / "a", seed=7)
    prepare(ml1m, tmp_path / "b", seed=7)
    prepare(ml1m, tmp_path / "c", seed=8)
    for split in ("train", "val", "test"):
        a, b, c = ((tmp_path / d / f"{split}.jsonl").read_bytes() for d in "abc")
        assert a == b
        assert a != c
    candidates = lambda d: [r["candidates"] for r in read_split(tmp_path / d, "test")]  # noqa: E731
    assert candidates("a") != candidates("c")


def _bad_rows(tmp_path, text):
    folder = write_ml1m(tmp_path / "src")
    lines = (folder / "ratings.dat").read_text(encoding="latin-1").splitlines(keepends=True)
    lines[2] = text
    (folder / "ratings.dat").write_text("".join(lines), encoding="latin-1")
    return folder


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1\t3\t5\t100\n", r"ratings\.dat line 3: expected 4 fields separated by '::', got 1; is this the ML-1M"),
        ("1::3::five::100\n", r"ratings\.dat line 3: rating 'five' is not a number"),
        ("1::3::5::noon\n", r"ratings\.dat line 3: timestamp 'noon' is not a number"),
        ("1::9999::5::100\n", r"ratings\.dat line 3: unknown movie id 9999 \(not in movies\.dat\)"),
    ],
)
def test_bad_rating_lines(tmp_path, text, expected):
    with pytest.raises(DataError, match=expected):
        prepare(_bad_rows(tmp_path, text), tmp_path / "out")


def test_bad_movie_line(tmp_path):
    movies = "1::Movie 01 (1951)::Drama\n2::Movie 02 (1952)\n"
    with pytest.raises(DataError, match=r"movies\.dat line 2: expected 3 fields"):
        prepare(write_ml1m(tmp_path / "src", rows=[], movies_text=movies), tmp_path / "out")


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"not found"):
        prepare(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"ratings\.dat \+ movies\.dat \(ML-1M\) or u\.data \+ u\.item"):
        prepare(tmp_path / "empty", tmp_path / "out")
    folder = write_ml1m(tmp_path / "src")
    (folder / "movies.dat").unlink()
    with pytest.raises(DataError, match=r"movies\.dat: file not found"):
        prepare(folder, tmp_path / "out")


def test_no_user_left(ml1m, tmp_path):
    with pytest.raises(DataError, match=r"ratings\.dat: no user has 23 or more .* 5 users\)"):
        prepare(ml1m, tmp_path / "out", min_history=20)
    assert not (tmp_path / "out").exists()


def test_main(ml1m, tmp_path, capsys):
    assert main(["prepare", "movielens", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lit_dpo: error: ") and err.count("\n") == 1 and "missing" in err
    argv = ["prepare", "movielens", "--source", str(ml1m), "--out", str(tmp_path / "o"), "--num-candidates", "8",
            "--tokenizer", "none"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["examples"]["test"] == 3
    assert (tmp_path / "o" / "test.jsonl").is_file()


def test_python_m_lit_dpo_prepare_movielens(ml1m, tmp_path, monkeypatch, capsys):
    """The package entry point dispatches `prepare movielens` (outside LightningCLI)."""
    import sys

    from lit_dpo.__main__ import main as package_main

    out = tmp_path / "prepared"
    monkeypatch.setattr(sys, "argv", ["lit_dpo", "prepare", "movielens", "--source", str(ml1m), "--out", str(out),
                                      "--tokenizer", "none"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        package_main()
    assert exit_info.value.code == 0
    assert all((out / f"{split}.jsonl").is_file() for split in ("train", "val", "test"))


def test_prepared_files_train_directly(ml1m, tmp_path, tiny_model_dir):
    """train.jsonl / val.jsonl are usable as data.train_path / data.val_path as they are."""
    from test_training import run_cli

    out = tmp_path / "prepared"
    prepare(ml1m, out, num_candidates=5, history_len=3)
    cli = run_cli(tmp_path, tiny_model_dir, "--trainer.max_steps=2", f"--data.train_path={out / 'train.jsonl'}",
                  f"--data.val_path={out / 'val.jsonl'}")
    assert cli.trainer.global_step == 2


def test_stats_report_token_lengths_with_the_chat_template(ml1m, tmp_path, tiny_model_dir, tiny_tokenizer):
    """stats.json says how long prompts are in the tokens training will see, to set data.max_prompt_length."""
    from lit_dpo.data.tokenize import encode_prompts

    stats = prepare(ml1m, tmp_path / "out", tokenizer=tiny_model_dir)
    records = [json.loads(line) for split in ("train", "val", "test") for line in (tmp_path / "out" / f"{split}.jsonl").open()]
    lengths = [len(ids) for ids in encode_prompts(tiny_tokenizer, [r["prompt"] for r in records], chat=True)]
    assert stats["prompt_tokens"]["max"] == max(lengths)
    assert stats["prompt_tokens"]["mean"] == round(sum(lengths) / len(lengths), 1)
    assert stats["answer_tokens"]["max"] >= 2  # title + EOS
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["prompt_tokens"] == stats["prompt_tokens"]
