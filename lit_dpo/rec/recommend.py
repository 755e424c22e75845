"""Recommendations from a trained checkpoint (`python -m lit_dpo recommend`): one movie per prompt.

Input: a JSONL file, one object per line with `prompt` (the user's history and the candidate list,
as in training) and `candidates` (the titles to choose from); an `id`, `prompt_id` or `user_id` is
carried through. Output: JSONL, one line per input line, in the same order::

    {"prompt_id": "u12", "recommendation": "Heat (1995)",       # the top candidate by log-likelihood
     "ranking": ["Heat (1995)", ...], "scores": [-3.2, ...],     # all candidates, best first
     "answer": "Heat (1995)", "answer_candidate": "Heat (1995)"}  # greedy answer and the candidate it names

The recommendation ranks the candidates by the policy's summed log-probability of each title as the
answer (what DPO trains), so it always names exactly one candidate; the greedy answer (`--generate`)
is what a chat deployment would say and may name none (`answer_candidate: null`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_dpo.errors import UserInputError
from lit_dpo.rec.metrics import candidate_scores, parse_answer
from lit_dpo.rec.scoring import generate_answer, score_candidates

ID_KEYS = ("prompt_id", "id", "user_id")


class RecommendInputError(UserInputError):
    """An input line that cannot be used; names file and line and the fix."""


def read_prompts(path: Path) -> list[dict]:
    """Validated input records: each has a non-empty string `prompt` and a non-empty list of string `candidates`."""
    if not path.is_file():
        raise RecommendInputError(f"recommend --input: not found: {path} (a JSONL file with prompt and candidates per line)")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecommendInputError(f"{path}:{number}: not valid JSON ({error.msg}); one JSON object per line") from error
            if not isinstance(record, dict):
                raise RecommendInputError(f"{path}:{number}: expected a JSON object with prompt and candidates")
            prompt, candidates = record.get("prompt"), record.get("candidates")
            if not isinstance(prompt, str) or not prompt.strip():
                raise RecommendInputError(f"{path}:{number}: `prompt` missing or not a non-empty string")
            if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) and c.strip() for c in candidates):
                raise RecommendInputError(f"{path}:{number}: `candidates` must be a non-empty list of titles (strings)")
            record_id = next((record[k] for k in ID_KEYS if k in record), number)
            records.append({"prompt": prompt, "candidates": candidates, "prompt_id": str(record_id)})
    if not records:
        raise RecommendInputError(f"recommend --input: {path} holds no records")
    return records


def recommend(module, tokenizer, records: list[dict], *, generate: bool, max_new_tokens: int, chat: bool, length_normalise: bool) -> list[dict]:
    """The output rows (module docstring) for `records`."""
    rows = []
    for record in records:
        summed, counts = score_candidates(module, tokenizer, record["prompt"], record["candidates"], use_chat_template=chat)
        scores = candidate_scores(summed, counts, normalise=length_normalise).tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the input order
        row = {
            "prompt_id": record["prompt_id"],
            "recommendation": record["candidates"][order[0]],
            "ranking": [record["candidates"][i] for i in order],
            "scores": [round(scores[i], 4) for i in order],
        }
        if generate:
            answer = generate_answer(module, tokenizer, record["prompt"], max_new_tokens, use_chat_template=chat)
            row.update(answer=answer, answer_candidate=parse_answer(answer, record["candidates"]))
        rows.append(row)
    return rows
