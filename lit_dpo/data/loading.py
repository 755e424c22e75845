"""Reading preference files into `datasets.Dataset`s and rejecting bad input with a one-line fix.

Preference data arrives hand-edited and half-converted more often than not. `datasets` reports such
problems as pyarrow errors that name neither the file nor the row, and only after a run directory exists.
Here every problem becomes a `DataError` naming the config key, the file, the row (or line) and the fix:

    data.train_path: /x/y.jsonl line 17: invalid JSON (Expecting ',' delimiter); fix or remove that line

JSON files are pre-scanned line by line with `json.loads` before `datasets` sees them, because a malformed
line or a value of the wrong type (a number where text belongs) makes `datasets` fail without a location.
Other formats are loaded first and their rows checked afterwards. Row numbers are 1-based data rows (for
JSON lines the n-th non-blank line, for CSV the n-th line after the header).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets

from lit_dpo.errors import UserInputError
from lit_dpo.files import cache_root, write_jsonl

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED = "give a .jsonl/.json/.parquet/.csv file or a saved dataset directory"
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes for a DatasetDict / Dataset


class DataError(UserInputError):
    """Bad data or data settings; the one-line message names the file, row and config key, and the fix."""


@dataclass(frozen=True)
class Columns:
    """Which columns hold the three texts, and the config keys that name them (for messages)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    def items(self) -> tuple[tuple[str, str], ...]:
        """(config key, column name) for the three text columns."""
        return (("prompt_column", self.prompt), ("chosen_column", self.chosen), ("rejected_column", self.rejected))


@dataclass
class Source:
    """A loaded, validated split and how many invalid rows were skipped to get it."""

    dataset: datasets.Dataset
    skipped_invalid: int
    negatives: int = 1
    """K, the rejected answers per row (the `rejected` column holds a list of K strings when K > 1)."""
    fingerprint: str = ""
    """Identifies these rows: the file (path, size, modification time), the split and the rows skipped.
    What the tokenization cache and the reference log-prob cache are keyed by."""

    def part(self, dataset: datasets.Dataset, name: str, **settings) -> Source:
        """A part of these rows (e.g. the validation share split off), fingerprinted by how it was cut."""
        fingerprint = digest({"source": self.fingerprint, "part": name, **settings})
        return Source(dataset, self.skipped_invalid if name == "train" else 0, self.negatives, fingerprint)


def digest(settings: dict) -> str:
    """A stable 32-hex-digit fingerprint of JSON-serialisable settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_identity(path: Path) -> list:
    """What changes when a file or a saved dataset folder is rewritten: resolved path, sizes, modification times."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return [str(path.resolve()), [[str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size,
                                   f.stat().st_mtime_ns] for f in files]]


def check_path(key: str, path: str) -> Path:
    """Cheap checks that can run in `__init__`: the path exists and is a format we read.

    Args:
        key: Config key holding the path, e.g. "train_path" (messages say "data.train_path").
        path: The configured path; `~` is expanded.

    Returns:
        The expanded path.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.{key}: file not found: {p} ({ACCEPTED})")
    if p.is_dir():
        if not any((p / marker).is_file() for marker in SAVED_MARKERS):
            raise DataError(
                f"data.{key}: {p} is a directory but not a dataset saved with save_to_disk "
                f"(it has no {' or '.join(SAVED_MARKERS)}); {ACCEPTED}"
            )
    elif p.suffix.lower() not in BUILDERS:
        raise DataError(f"data.{key}: unsupported file type '{p.suffix}' for {p} ({ACCEPTED})")
    return p


def saved_splits(path: Path) -> list[str]:
    """Split names of a saved DatasetDict directory; empty for files and saved single Datasets."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return []
    return list(json.loads(index.read_text())["splits"])


def load_source(key: str, path: str, columns: Columns, skip_invalid_rows: bool, splits: tuple[str, ...]) -> Source:
    """Load one split of preference pairs and validate it.

    Args:
        key: Config key the path came from ("train_path", "val_path", "test_path"), for messages.
        path: A .jsonl/.json/.parquet/.csv file or a `save_to_disk` directory.
        columns: Names of the prompt/chosen/rejected columns.
        skip_invalid_rows: Drop rows with a missing, non-string or blank text field (or another number of
            rejected answers than the first row) instead of raising. `rejected` may hold one string or a
            non-empty list of K strings (K rejected answers for S-DPO), the same K in every row.
        splits: For a saved DatasetDict, the split names to try in order; a dict with a single split
            uses that split. Ignored for files and saved single Datasets.

    Returns:
        The dataset (all original columns kept), the number of rows skipped as invalid, and K.

    Raises:
        DataError: On any problem, with a one-line message saying where and how to fix it.
    """
    p = check_path(key, path)
    if p.suffix.lower() in BUILDERS and BUILDERS[p.suffix.lower()] == "json" and not p.is_dir():
        return _load_json(key, p, columns, skip_invalid_rows)
    where, split = str(p), None
    try:
        if p.is_dir():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                split = _pick_split(key, p, list(loaded), splits)
                loaded, where = loaded[split], f"{p} [split '{split}']"
            dataset = loaded
        else:
            kwargs = {}
            if p.suffix.lower() == ".csv":
                # Read the text columns verbatim: otherwise "5" becomes an int and "NA"/"None" become null.
                kwargs = {"converters": {name: str for _, name in columns.items()}, "keep_default_na": False}
            dataset = datasets.load_dataset(BUILDERS[p.suffix.lower()], data_files=str(p), split="train", **kwargs)
    except DataError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types; all mean "this file cannot be read"
        raise DataError(f"data.{key}: could not read {p}: {_one_line(err)}") from err
    _check_columns(key, where, dataset.column_names, columns)
    names = [name for _, name in columns.items()]
    rows = (row for batch in dataset.select_columns(names).iter(batch_size=1024) for row in _unbatch(batch))
    invalid, negatives = _find_invalid(key, where, enumerate(rows, start=1), columns, skip_invalid_rows)
    if invalid:
        bad = set(invalid)
        dataset = dataset.select([i for i in range(len(dataset)) if i + 1 not in bad])
    if len(dataset) == 0:
        raise DataError(_empty_message(key, where, len(invalid)))
    fingerprint = digest({"file": file_identity(p), "split": split, "columns": columns.items(), "invalid": invalid})
    return Source(dataset, len(invalid), negatives, fingerprint)


def _load_json(key: str, p: Path, columns: Columns, skip_invalid_rows: bool) -> Source:
    records = list(_json_records(key, p))
    if not records:
        raise DataError(_empty_message(key, str(p), 0))
    found: dict[str, None] = {}  # insertion-ordered union of keys, for the missing-column message
    for _, _, record in records:
        found.update(dict.fromkeys(record))
    _check_columns(key, str(p), list(found), columns)
    invalid, negatives = _find_invalid(key, str(p), ((row, rec) for row, _, rec in records), columns, skip_invalid_rows)
    if len(invalid) == len(records):
        raise DataError(_empty_message(key, str(p), len(invalid)))
    if invalid:
        # datasets cannot load a file with mixed value types, so load a copy without the invalid rows.
        bad = set(invalid)
        stat = p.stat()
        key_text = f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{columns}"
        load_path = cache_root() / "cleaned" / f"{p.stem}-{hashlib.sha256(key_text.encode()).hexdigest()[:12]}.jsonl"
        if not load_path.is_file():
            write_jsonl([rec for row, _, rec in records if row not in bad], load_path)
    else:
        load_path = p
    try:
        dataset = datasets.load_dataset("json", data_files=str(load_path), split="train")
    except Exception as err:  # e.g. a non-text column whose type changes between rows
        raise DataError(f"data.{key}: could not read {p}: {_one_line(err)}") from err
    fingerprint = digest({"file": file_identity(p), "columns": columns.items(), "invalid": invalid})
    return Source(dataset, len(invalid), negatives, fingerprint)


def _json_records(key: str, p: Path) -> Iterator[tuple[int, int, dict]]:
    """Yield (row, line, record) for a JSON-lines file or a JSON array; raise on the first bad line."""
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"data.{key}: {p} line {err.lineno}: invalid JSON ({err.msg}); fix that line") from err
        for row, record in enumerate(array, start=1):
            if not isinstance(record, dict):
                raise DataError(
                    f"data.{key}: {p} row {row}: expected a JSON object, got {type(record).__name__}; fix that row"
                )
            yield row, row, record
        return
    row = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines are harmless and datasets skips them too
        row += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data.{key}: {p} line {line_no}: invalid JSON ({err.msg}); fix or remove that line"
            ) from err
        if not isinstance(record, dict):
            raise DataError(
                f"data.{key}: {p} line {line_no}: expected a JSON object, got {type(record).__name__}; "
                "fix or remove that line"
            )
        yield row, line_no, record


def _pick_split(key: str, p: Path, available: list[str], wanted: tuple[str, ...]) -> str:
    for split in wanted:
        if split in available:
            return split
    if len(available) == 1:
        return available[0]
    raise DataError(
        f"data.{key}: {p} holds splits {', '.join(available)} but none of {', '.join(wanted)}; "
        f"save the split you want on its own or rename it to '{wanted[0]}'"
    )


def _check_columns(key: str, where: str, found: list[str], columns: Columns) -> None:
    for config_key, name in columns.items():
        if name not in found:
            raise DataError(
                f"data.{key}: {where} is missing column '{name}' (found: {', '.join(found) or 'none'}); "
                f"rename it or set data.{config_key}"
            )


def _find_invalid(
    key: str, where: str, rows: Iterable[tuple[int, dict]], columns: Columns, skip_invalid_rows: bool
) -> tuple[list[int], int]:
    """Row numbers with a missing, non-string or blank text field, or with another number of rejected
    answers than the first valid row; raises on the first unless skipping.

    Returns:
        The invalid row numbers and K, the number of rejected answers per row (1 for a plain string).
    """
    invalid, shape, first_row = [], None, 0
    for row, record in rows:
        problem = _row_problem(record, columns)
        if problem is None:
            found = _rejected_shape(record[columns.rejected])
            if shape is None:
                shape, first_row = found, row
            elif found != shape:
                problem = (
                    f"'{columns.rejected}' holds {_describe(found)} but row {first_row} holds {_describe(shape)}; "
                    "every row needs the same number of rejected answers"
                )
        if problem is None:
            continue
        if not skip_invalid_rows:
            raise DataError(
                f"data.{key}: {where} row {row}: {problem}; "
                "fix the row or set data.skip_invalid_rows: true to skip such rows"
            )
        invalid.append(row)
    return invalid, 1 if shape in (None, "text") else shape


def _rejected_shape(value: str | list) -> str | int:
    # A string and a one-element list both mean one negative, but a file cannot mix them (one column type).
    return "text" if isinstance(value, str) else len(value)


def _describe(shape: str | int) -> str:
    return "one string" if shape == "text" else f"a list of {shape}"


def _row_problem(record: dict, columns: Columns) -> str | None:
    for _, name in columns.items():
        value = record.get(name)
        if value is None:
            return f"'{name}' is missing or null"
        if name == columns.rejected and isinstance(value, list):  # K rejected answers (S-DPO)
            if not value:
                return f"'{name}' is an empty list"
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    return f"'{name}'[{i}] is not a string (got {type(item).__name__})"
                if not item.strip():
                    return f"'{name}'[{i}] is empty"
            continue
        if not isinstance(value, str):
            return f"'{name}' is not a string (got {type(value).__name__})"
        if not value.strip():
            return f"'{name}' is empty"
    return None


def _unbatch(batch: dict[str, list]) -> Iterator[dict]:
    names = list(batch)
    for values in zip(*(batch[name] for name in names)):
        yield dict(zip(names, values))


def _empty_message(key: str, where: str, n_invalid: int) -> str:
    if n_invalid:
        return f"data.{key}: {where}: all {n_invalid} rows are invalid (missing, non-string or empty text); fix them"
    return f"data.{key}: {where} has no rows; {ACCEPTED} with at least one preference pair"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"
