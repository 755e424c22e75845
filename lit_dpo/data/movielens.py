"""Build next-movie preference pairs from a MovieLens download (ML-1M or ML-100K) with leave-one-out splits.

The synthetic set (`lit_dpo.data.synthetic`) proves the trainer learns; this module turns real MovieLens
ratings into the same task, following LLaRA (Liao et al., 2024, arXiv:2312.02445) and S-DPO (Chen et al.,
2024, arXiv:2406.09215): given a user's viewing history and a candidate list, name the movie watched next.

Per user, the movies rated >= `min_rating` are ordered by timestamp (ties keep file order). The last one is
the test target, the second-to-last the validation target and the one before that the train target, each
with the positives before it as history (leave-one-out by time, so no split sees its own future). With
`sliding_windows=True` every position with at least `min_history` earlier positives, up to the train target,
becomes a train example. Users with fewer than `min_history + 3` positives are dropped and counted.

Records extend the schema shared with the synthetic set:
`{"prompt", "chosen", "rejected", "candidates", "target", "user_id"}` with `target == chosen`. With
`num_negatives == 1`, `rejected` is one title (a string) as DPO expects; with `num_negatives > 1` it is a
list of distinct titles, for multi-negative losses such as S-DPO. Negatives come uniformly from movies the
user never rated positively, so a candidate the user actually liked later is never labelled "rejected".

MovieLens is licensed for research use and must not be redistributed: never commit the files; tests write
tiny look-alike fixtures instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lit_dpo.data.loading import DataError
from lit_dpo.files import write_json, write_jsonl

# The 19 genre flags of u.item, in file order (ML-100K README).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Where one MovieLens release keeps its ratings and movies, and how their lines are split."""

    name: str
    ratings: str
    movies: str
    ratings_sep: str
    movies_sep: str
    movie_fields: int


ML_1M = Layout("ML-1M", "ratings.dat", "movies.dat", "::", "::", 3)
ML_100K = Layout("ML-100K", "u.data", "u.item", "\t", "|", 5 + len(ML100K_GENRES))


@dataclass(frozen=True)
class Movie:
    """One catalogue entry; `title` already ends in "(Year)" in both releases."""

    title: str
    genres: tuple[str, ...]

    @property
    def history_label(self) -> str:
        """How the movie appears in a history: the title plus its genres, so tastes can be read off."""
        return f"{self.title} [{', '.join(self.genres)}]" if self.genres else self.title


def detect_format(source: Path) -> Layout:
    """Which release `source` holds, judged by the files present.

    Raises:
        DataError: If `source` is not a directory, holds neither release, or lacks the movie file.
    """
    if not source.is_dir():
        raise DataError(f"{source}: MovieLens source directory not found; pass the unzipped ml-1m or ml-100k folder")
    for layout in (ML_1M, ML_100K):
        if (source / layout.ratings).is_file():
            if not (source / layout.movies).is_file():
                missing = source / layout.movies
                raise DataError(f"{missing}: file not found; {layout.name} needs it next to {layout.ratings}")
            return layout
    raise DataError(
        f"{source}: no MovieLens files found; expected ratings.dat + movies.dat (ML-1M) or u.data + u.item (ML-100K)"
    )


def _lines(path: Path, sep: str, fields: int, release: str):
    """Yield (line number, fields) for each non-blank line, failing on a wrong field count."""
    # latin-1 decodes every byte; both releases use it for accented titles.
    with path.open(encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) != fields:
                raise DataError(
                    f"{path} line {number}: expected {fields} fields separated by {sep!r}, got {len(parts)}; "
                    f"is this the {release} file?"
                )
            yield number, parts


def _number(path: Path, number: int, what: str, text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise DataError(f"{path} line {number}: {what} {text!r} is not a number; fix or remove that line") from None


def read_movies(path: Path, layout: Layout) -> dict[int, Movie]:
    """Parse movies.dat (`id::title::A|B`) or u.item (`id|title|date|video date|url|19 genre flags`)."""
    movies = {}
    for number, parts in _lines(path, layout.movies_sep, layout.movie_fields, layout.name):
        movie_id = int(_number(path, number, "movie id", parts[0], int))
        if layout is ML_1M:
            genres = tuple(g for g in parts[2].split("|") if g)
        else:
            genres = tuple(g for g, flag in zip(ML100K_GENRES, parts[5:]) if flag.strip() == "1" and g != "unknown")
        movies[movie_id] = Movie(parts[1].strip(), genres)
    return movies


def read_positives(path: Path, layout: Layout, movies: dict[int, Movie], min_rating: float) -> tuple[dict, dict]:
    """Per-user chronological lists of movie ids rated >= `min_rating`, plus read counts for the stats.

    Returns:
        `(positives, counts)`: user id -> movie ids ordered by (timestamp, line), and
        `{"ratings", "positive_ratings", "users"}`.
    """
    rows: dict[int, list[tuple[int, int]]] = {}
    users, ratings = set(), 0
    for number, parts in _lines(path, layout.ratings_sep, 4, layout.name):
        user = int(_number(path, number, "user id", parts[0], int))
        movie = int(_number(path, number, "movie id", parts[1], int))
        rating = _number(path, number, "rating", parts[2], float)
        timestamp = int(_number(path, number, "timestamp", parts[3], int))
        if movie not in movies:
            raise DataError(f"{path} line {number}: unknown movie id {movie} (not in {layout.movies})")
        users.add(user)
        ratings += 1
        if rating >= min_rating:
            rows.setdefault(user, []).append((timestamp, movie))
    # sort() is stable, so equal timestamps keep file order.
    positives = {u: [m for _, m in sorted(r, key=lambda row: row[0])] for u, r in rows.items()}
    counts = {"ratings": ratings, "positive_ratings": sum(len(v) for v in positives.values()), "users": len(users)}
    return positives, counts


def _format_prompt(history: list[Movie], candidates: list[str]) -> str:
    # Same wording as the synthetic set, so a model trained on one reads the other.
    watched = ", ".join(m.history_label for m in history)
    return (
        f"The user has watched the following movies in this order: {watched}. "
        "Which movie from the candidate list is the user most likely to watch next?\n"
        f"Candidates: {', '.join(candidates)}\n"
        "Answer with exactly one title from the candidate list."
    )


def _draw_order(rng: random.Random, pool: list[int], num_candidates: int):
    """Movie ids from `pool` in uniformly random order, without repeats, drawn lazily."""
    if len(pool) <= 4 * num_candidates:
        yield from rng.sample(pool, len(pool))
        return
    # Shuffling all ~3,700 ML-1M movies per example would dominate run time with sliding windows;
    # rejection sampling needs only about num_candidates draws when the pool is large.
    drawn: set[int] = set()
    while len(drawn) < len(pool):
        movie_id = pool[rng.randrange(len(pool))]
        if movie_id not in drawn:
            drawn.add(movie_id)
            yield movie_id


def _example(rng, user, history_ids, target_id, movies, negative_pool, history_len, num_candidates, num_negatives):
    target = movies[target_id].title
    # Titles repeat across ids in ML-100K; skip a title already listed so the target appears exactly once.
    negatives, seen = [], {target}
    for movie_id in _draw_order(rng, negative_pool, num_candidates):
        title = movies[movie_id].title
        if title not in seen:
            seen.add(title)
            negatives.append(title)
            if len(negatives) == num_candidates - 1:
                break
    if len(negatives) < num_candidates - 1:
        raise DataError(
            f"user {user} has only {len(negatives)} distinct movies not rated positively, fewer than "
            f"num_candidates - 1 = {num_candidates - 1}; lower --num-candidates"
        )
    candidates = [target, *negatives]
    rng.shuffle(candidates)
    rejected = rng.sample(negatives, num_negatives)
    history = [movies[m] for m in history_ids[-history_len:]]  # oldest dropped first
    return {
        "prompt": _format_prompt(history, candidates),
        "chosen": target,
        "rejected": rejected[0] if num_negatives == 1 else rejected,
        "candidates": candidates,
        "target": target,
        "user_id": user,
    }


def _check_settings(history_len, num_candidates, num_negatives, min_history) -> None:
    if history_len < 1:
        raise DataError(f"--history-len must be >= 1, got {history_len}")
    if num_candidates < 2:
        raise DataError(f"--num-candidates must be >= 2 (the target plus a negative), got {num_candidates}")
    if not 1 <= num_negatives < num_candidates:
        top = num_candidates - 1
        raise DataError(f"--num-negatives must be in [1, num_candidates - 1 = {top}], got {num_negatives}")
    if min_history < 1:
        raise DataError(f"--min-history must be >= 1, got {min_history}")


def prepare_movielens(
    source: str | Path,
    out: str | Path,
    *,
    min_rating: float = 4.0,
    history_len: int = 10,
    num_candidates: int = 20,
    num_negatives: int = 1,
    min_history: int = 3,
    sliding_windows: bool = False,
    seed: int = 0,
    tokenizer: str | None = None,
) -> dict:
    """Turn a MovieLens folder into `train/val/test.jsonl` preference pairs plus `stats.json` in `out`.

    Args:
        source: Unzipped ml-1m (ratings.dat, movies.dat) or ml-100k (u.data, u.item) folder.
        out: Output folder, created if missing; existing split files are replaced.
        min_rating: Ratings at or above this (1-5 stars) count as "watched and liked".
        history_len: Most recent positives shown in the prompt; older ones are dropped first.
        num_candidates: Titles in each candidate list, the target included.
        num_negatives: Rejected titles per example: 1 gives a string, more give a list of strings.
        min_history: Fewest earlier positives a train example needs; users need `min_history + 3` positives.
        sliding_windows: Emit every eligible position as a train example, not just the last one.
        seed: Seed; each user draws from `random.Random(f"{seed}-{user}")`, independent of iteration order.
        tokenizer: Tokenizer (as `model_name_or_path`) to measure prompt and answer lengths in tokens with
            the chat template, as training will see them; None reports characters only.

    Returns:
        The stats also written to `stats.json`: counts read, users kept/dropped, examples per split and prompt
        length in characters.

    Raises:
        DataError: On a missing or malformed file (naming file and line), bad settings, or no user left.
    """
    _check_settings(history_len, num_candidates, num_negatives, min_history)
    source, out = Path(source).expanduser(), Path(out).expanduser()
    layout = detect_format(source)
    movies = read_movies(source / layout.movies, layout)
    positives, counts = read_positives(source / layout.ratings, layout, movies, min_rating)

    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    dropped = 0
    all_ids = sorted(movies)
    for user in sorted(positives):
        seq = positives[user]
        n = len(seq)
        if n < min_history + 3:
            dropped += 1
            continue
        rng = random.Random(f"{seed}-{user}")
        liked = set(seq)
        pool = [m for m in all_ids if m not in liked]
        train_positions = range(min_history, n - 2) if sliding_windows else [n - 3]
        targets = [("train", i) for i in train_positions] + [("val", n - 2), ("test", n - 1)]
        for split, i in targets:
            example = _example(rng, user, seq[:i], seq[i], movies, pool, history_len, num_candidates, num_negatives)
            splits[split].append(example)
    # Users with no positive rating at all never reach the loop but are short-history users too.
    dropped += counts["users"] - len(positives)
    if not splits["test"]:
        raise DataError(
            f"{source / layout.ratings}: no user has {min_history + 3} or more movies rated >= {min_rating} "
            f"({counts['ratings']} ratings, {counts['positive_ratings']} positive, {counts['users']} users); "
            "lower --min-rating or --min-history"
        )

    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        write_jsonl(records, out / f"{name}.jsonl")
    lengths = [len(r["prompt"]) for records in splits.values() for r in records]
    stats = {
        "format": layout.name,
        "source": str(source),
        "users": counts["users"],
        "items": len(movies),
        "ratings": counts["ratings"],
        "positive_ratings": counts["positive_ratings"],
        "users_kept": len(splits["test"]),
        "users_dropped": dropped,
        "examples": {name: len(records) for name, records in splits.items()},
        "prompt_chars": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        **(_token_lengths(tokenizer, splits) if tokenizer else {}),
        "settings": {
            "min_rating": min_rating, "history_len": history_len, "num_candidates": num_candidates,
            "num_negatives": num_negatives, "min_history": min_history, "sliding_windows": sliding_windows,
            "seed": seed,
        },  # fmt: skip
    }
    write_json(out / "stats.json", stats)
    return stats


def _token_lengths(tokenizer_name: str, splits: dict[str, list[dict]]) -> dict:
    """Prompt (chat-templated) and answer lengths in tokens: what to set data.max_prompt_length from."""
    from lit_dpo.data.tokenize import encode_completions, encode_prompts
    from lit_dpo.models.sources import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    records = [r for rs in splits.values() for r in rs]
    chat = tokenizer.chat_template is not None
    prompts = [len(ids) for ids in encode_prompts(tokenizer, [r["prompt"] for r in records], chat)]
    answers = [len(ids) for ids in encode_completions(tokenizer, [r["chosen"] for r in records])]

    def summary(values: list[int]) -> dict:
        ordered = sorted(values)
        return {"mean": round(sum(values) / len(values), 1), "p95": ordered[int(0.95 * (len(ordered) - 1))], "max": ordered[-1]}

    return {"tokenizer": tokenizer_name, "prompt_tokens": summary(prompts), "answer_tokens": summary(answers)}
