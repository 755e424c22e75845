"""The embedded default dataset: synthetic movie-recommendation preference pairs.

It exists so that `python -m lit_dpo fit` works with no data download and the model has a preference it can
actually learn in a few hundred steps. The task follows LLaRA (Liao et al., 2024, arXiv:2312.02445) and S-DPO
(Chen et al., 2024, arXiv:2406.09215): given a viewing history and a candidate list, name the movie the user
watches next. Each synthetic user leans towards one or two favourite genres; exactly one candidate belongs to
a favourite genre, and that one is the chosen answer.

Two choices make the preference learnable from the prompt alone:
  * the history shows each movie's genre, so the favourite genres can be read off it;
  * every title carries a genre keyword ("The Silent Heist" is crime, "Curse of the Valley" horror), so a
    candidate's genre can be inferred from its title even though candidates are shown as "Title (Year)".

Records have the schema shared with the MovieLens builder:
`{"prompt": str, "chosen": str, "rejected": str, "candidates": list[str], "target": str}`, with
`target == chosen` and both `chosen` and `rejected` drawn from `candidates`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GENRES = (
    "Action",
    "Animation",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Horror",
    "Romance",
    "Science Fiction",
    "Western",
)
# One keyword list per genre: every title contains one of these, which ties a title to its genre.
GENRE_KEYWORDS = {
    "Action": ("Fury", "Strike", "Bullet", "Mission", "Vendetta", "Showdown", "Impact", "Firestorm"),
    "Animation": ("Dragon", "Kingdom", "Paws", "Balloon", "Toybox", "Puppy", "Fairy", "Rainbow"),
    "Comedy": ("Wedding", "Vacation", "Roommates", "Neighbors", "Bachelor", "Mixup", "Party", "Prank"),
    "Crime": ("Heist", "Gangster", "Alibi", "Detective", "Syndicate", "Witness", "Racket", "Mobster"),
    "Documentary": ("Chronicles", "Portrait", "Expedition", "Truth", "Voices", "Archive", "Footage", "Legacy"),
    "Drama": ("Letters", "Promise", "Family", "Inheritance", "Farewell", "Daughter", "Orchard", "Memory"),
    "Horror": ("Haunting", "Curse", "Blood", "Shadows", "Nightmare", "Possession", "Crypt", "Ghosts"),
    "Romance": ("Love", "Heart", "Kiss", "Valentine", "Sweetheart", "Romance", "Honeymoon", "Serenade"),
    "Science Fiction": ("Galaxy", "Android", "Planet", "Starship", "Quantum", "Cosmos", "Robot", "Orbit"),
    "Western": ("Outlaw", "Frontier", "Saddle", "Sheriff", "Stagecoach", "Gunslinger", "Prairie", "Ranch"),
}
# Genre-neutral words, so titles are not just the keyword.
ADJECTIVES = (
    "Dark", "Last", "Silent", "Golden", "Broken", "Hidden", "Lost", "Long",
    "Little", "Secret", "Wild", "Endless", "Crimson", "Quiet", "Final",
)  # fmt: skip
NOUNS = (
    "River", "Road", "House", "City", "Midnight", "Summer", "Winter", "Island",
    "Garden", "Bridge", "Station", "Harbor", "Valley", "Mountain", "Street",
)  # fmt: skip

GENERATOR_VERSION = 1  # bump whenever the records below change, so cached synthetic files are regenerated
MOVIES_PER_GENRE = 30  # 10 genres x 30 = a 300-movie catalogue
FAVOURITE_SHARE = 0.8  # fraction of a user's history drawn from the favourite genres
YEARS = (1950, 2020)


@dataclass(frozen=True)
class Movie:
    """One catalogue entry."""

    title: str
    genre: str
    year: int

    @property
    def label(self) -> str:
        """The answer string: "Title (Year)"."""
        return f"{self.title} ({self.year})"


def build_catalogue(rng: random.Random) -> list[Movie]:
    """A catalogue of `MOVIES_PER_GENRE` uniquely titled movies per genre, drawn from `rng`."""
    taken: set[str] = set()
    movies = []
    for genre in GENRES:
        keywords = GENRE_KEYWORDS[genre]
        count = 0
        while count < MOVIES_PER_GENRE:
            keyword = rng.choice(keywords)
            pattern = rng.randrange(3)
            if pattern == 0:
                title = f"The {rng.choice(ADJECTIVES)} {keyword}"
            elif pattern == 1:
                title = f"{keyword} of the {rng.choice(NOUNS)}"
            else:
                title = f"{rng.choice(NOUNS)} {keyword}"
            if title in taken:
                continue
            taken.add(title)
            movies.append(Movie(title, genre, rng.randint(*YEARS)))
            count += 1
    return movies


def _format_prompt(history: list[Movie], candidates: list[Movie]) -> str:
    watched = ", ".join(f"{m.title} ({m.year}, {m.genre})" for m in history)
    listed = ", ".join(m.label for m in candidates)
    return (
        f"The user has watched the following movies in this order: {watched}. "
        "Which movie from the candidate list is the user most likely to watch next?\n"
        f"Candidates: {listed}\n"
        "Answer with exactly one title from the candidate list."
    )


def _make_pair(rng: random.Random, catalogue: list[Movie], history_len: int, num_candidates: int) -> dict:
    favourites = set(rng.sample(GENRES, rng.choice((1, 2))))
    liked = [m for m in catalogue if m.genre in favourites]
    others = [m for m in catalogue if m.genre not in favourites]

    # Sample the whole history without replacement, then interleave: order within the history is random.
    n_liked = sum(rng.random() < FAVOURITE_SHARE for _ in range(history_len))
    history_liked = rng.sample(liked, n_liked)
    history_others = rng.sample(others, history_len - n_liked)
    history = history_liked + history_others
    rng.shuffle(history)

    seen = set(history)
    target = rng.choice([m for m in liked if m not in seen])
    negatives = rng.sample([m for m in others if m not in seen], num_candidates - 1)
    candidates = [target, *negatives]
    rng.shuffle(candidates)
    rejected = rng.choice(negatives)
    return {
        "prompt": _format_prompt(history, candidates),
        "chosen": target.label,
        "rejected": rejected.label,
        "candidates": [m.label for m in candidates],
        "target": target.label,
    }


def generate_pairs(num_pairs: int, seed: int = 0, history_len: int = 10, num_candidates: int = 10) -> list[dict]:
    """Generate synthetic preference pairs, fully determined by the arguments.

    The first `k` records of `generate_pairs(n, seed)` equal `generate_pairs(k, seed)` for `k <= n`.

    Args:
        num_pairs: Number of records to generate.
        seed: Seed of the private `random.Random` that draws the catalogue and the users.
        history_len: Movies in each user's viewing history (1 to 29).
        num_candidates: Titles in each candidate list, the target included (2 to 241 - history_len).

    Returns:
        Records `{"prompt", "chosen", "rejected", "candidates", "target"}`; `target == chosen`.

    Raises:
        ValueError: If an argument is out of range.
    """
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    if not 1 <= history_len < MOVIES_PER_GENRE:
        raise ValueError(f"history_len must be in [1, {MOVIES_PER_GENRE - 1}], got {history_len}")
    # The smallest pool of non-favourite movies (two favourite genres) must hold the history and negatives.
    max_candidates = (len(GENRES) - 2) * MOVIES_PER_GENRE - history_len + 1
    if not 2 <= num_candidates <= max_candidates:
        raise ValueError(f"num_candidates must be in [2, {max_candidates}], got {num_candidates}")
    rng = random.Random(seed)
    catalogue = build_catalogue(rng)
    return [_make_pair(rng, catalogue, history_len, num_candidates) for _ in range(num_pairs)]
