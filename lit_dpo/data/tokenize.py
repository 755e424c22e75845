"""Tokenizing preference pairs and fitting them into `max_length`: one split at a time, cached by `datasets`.

Prompts are truncated from the left because the end of a prompt (the question and, with a chat template,
the assistant header) is what the completion follows; completions are never truncated, since DPO compares
their full log-probabilities. A pair whose completion alone cannot fit is dropped and counted.

Tokenization runs through `datasets.Dataset.map` with an explicit fingerprint (source rows + tokenizer +
settings), so a second run over the same data reads the tokenized Arrow cache instead of re-tokenizing.
"""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np

from lit_dpo.data.loading import Columns, DataError, digest

TOKENIZATION_VERSION = 2  # bump when `tokenize_batch` changes, so cached tokenized datasets are not reused
HELPER_COLUMNS = ("_too_long", "_truncated", "_identical", "_prompt_len", "_completion_len")


def fit_prompt(prompt_ids: list[int], completion_len: int, max_prompt_length: int, max_length: int) -> list[int] | None:
    """Left-truncate a prompt so that prompt + completion fits; None when even one prompt token cannot fit.

    Args:
        prompt_ids: Prompt token ids.
        completion_len: Tokens in the longest completion of the pair (EOS included).
        max_prompt_length: Upper bound on prompt tokens kept.
        max_length: Upper bound on prompt + completion tokens.

    Returns:
        The last `min(max_prompt_length, max_length - completion_len)` prompt tokens, or None if that is < 1.
    """
    budget = min(max_prompt_length, max_length - completion_len)
    if budget < 1:
        return None
    return prompt_ids[-budget:]


def tokenize_batch(
    batch: dict[str, list], tokenizer, columns: Columns, chat: bool, max_prompt_length: int, max_length: int
) -> dict[str, list]:
    """`Dataset.map` function: token ids for prompt/chosen/rejected plus the helper columns used for stats.

    A `rejected` value that is a list of K strings (K rejected answers, for S-DPO) becomes a list of K id
    lists in `rejected_input_ids`; a plain string stays one id list. The prompt is fitted to the longest of
    all answers, since each answer follows the prompt on its own in the plain layout.
    """
    prompt_ids = encode_prompts(tokenizer, batch[columns.prompt], chat)
    chosen = encode_completions(tokenizer, batch[columns.chosen])
    rejected = _encode_rejected(tokenizer, batch[columns.rejected])

    out: dict[str, list] = {name: [] for name in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
    out.update({name: [] for name in HELPER_COLUMNS})
    for prompt, good, bad in zip(prompt_ids, chosen, rejected):
        negatives = bad if bad and isinstance(bad[0], list) else [bad]
        completion_len = max(len(good), *(len(n) for n in negatives))
        fitted = fit_prompt(prompt, completion_len, max_prompt_length, max_length)
        out["prompt_input_ids"].append(fitted or [])
        out["chosen_input_ids"].append(good)
        out["rejected_input_ids"].append(bad)
        out["_too_long"].append(fitted is None)
        out["_truncated"].append(fitted is not None and len(fitted) < len(prompt))
        out["_identical"].append(any(good == n for n in negatives))
        out["_prompt_len"].append(len(fitted or []))
        out["_completion_len"].append(completion_len)
    return out


def _encode_rejected(tokenizer, values: list) -> list:
    """Completion ids of each row's rejected answer, or of each of its K rejected answers (one flat call)."""
    if not values or isinstance(values[0], str):
        return encode_completions(tokenizer, values)
    flat = encode_completions(tokenizer, [text for row in values for text in row])
    out, start = [], 0
    for row in values:
        out.append(flat[start : start + len(row)])
        start += len(row)
    return out


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Prompt ids: with `chat`, each prompt as one user turn plus the assistant header (the template
    carries the special tokens); without, the plain prompt with the tokenizer's own special tokens."""
    if not chat:
        return tokenizer(prompts)["input_ids"]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_completions(tokenizer, texts: list[str]) -> list[list[int]]:
    """Completion ids: the text, then EOS. EOS closes the assistant turn; the model must learn to stop,
    so it is part of what is scored."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tokenizer_digest(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and rules, so a changed tokenizer under the same path re-tokenizes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def tokenize_split(
    dataset: datasets.Dataset,
    fingerprint: str,
    tokenizer,
    columns: Columns,
    *,
    chat: bool,
    max_prompt_length: int,
    max_length: int,
    split: str,
    key: str,
) -> tuple[datasets.Dataset, dict, np.ndarray, str]:
    """Tokenize one split, fit every pair into `max_length`, drop the pairs that cannot fit.

    Args:
        dataset: The loaded rows (`lit_dpo.data.loading.Source.dataset`).
        fingerprint: Their `Source.fingerprint`.
        tokenizer: The policy's tokenizer.
        columns: Which columns hold the texts.
        chat: Wrap prompts in the tokenizer's chat template.
        max_prompt_length: Prompt tokens kept, from the end.
        max_length: Longest prompt + answer.
        split: "train", "val" or "test", for messages.
        key: The config key the rows came from ("train_path", ...), for messages.

    Returns:
        `(tokenized, stats, lengths, fingerprint)`: the rows with token-id columns (texts removed, extra
        columns kept); the split's stats (see `PreferenceDataModule.stats`); each kept pair's tokens
        (prompt + longest answer); and the fingerprint of `tokenized`, which identifies its content.
    """
    settings = {
        "source": fingerprint,
        "tokenizer": tokenizer.name_or_path,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab": tokenizer_digest(tokenizer),
        "chat_template": tokenizer.chat_template if chat else None,
        "columns": columns.items(),
        "max_prompt_length": max_prompt_length,
        "max_length": max_length,
        "version": TOKENIZATION_VERSION,
    }
    fingerprint = digest(settings)
    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "columns": columns, "chat": chat, "max_prompt_length": max_prompt_length,
                   "max_length": max_length},
        remove_columns=[name for _, name in columns.items()],
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {split} pairs",
    )
    flags = tokenized.select_columns(list(HELPER_COLUMNS)).with_format("numpy")[:]
    keep = np.flatnonzero(~flags["_too_long"])
    if len(keep) == 0:
        raise DataError(
            f"data.{key}: all {len(tokenized)} {split} pairs were dropped as too long: even the shortest needs "
            f"{int(flags['_completion_len'].min())} completion tokens, more than data.max_length - 1 = "
            f"{max_length - 1}; raise data.max_length or shorten the completions"
        )
    kept = {name: values[keep] for name, values in flags.items()}
    stats = {
        "pairs": len(keep),
        "dropped_too_long": len(tokenized) - len(keep),
        "identical_pairs": int(kept["_identical"].sum()),
        "truncated_prompts": int(kept["_truncated"].sum()),
        "prompt_tokens_mean": float(kept["_prompt_len"].mean()),
        "prompt_tokens_max": int(kept["_prompt_len"].max()),
        "completion_tokens_mean": float(kept["_completion_len"].mean()),
        "completion_tokens_max": int(kept["_completion_len"].max()),
    }
    if stats["dropped_too_long"]:
        fingerprint = digest({"tokenized": fingerprint, "dropped_too_long": True})
        tokenized = tokenized.select(keep, new_fingerprint=fingerprint)
    fingerprint = digest({"tokenized": fingerprint, "helper_columns": "removed"})
    tokenized = tokenized.remove_columns(list(HELPER_COLUMNS), new_fingerprint=fingerprint)
    return tokenized, stats, kept["_prompt_len"] + kept["_completion_len"], fingerprint
