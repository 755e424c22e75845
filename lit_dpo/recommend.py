"""`python -m lit_dpo recommend`: one recommended movie per prompt, from a trained checkpoint.

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

import argparse
import json
import sys
from pathlib import Path

from lit_dpo.errors import UserInputError
from lit_dpo.evaluation import parse_answer

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
    from lit_dpo.evaluation import candidate_scores
    from lit_dpo.ranking import generate_answer, score_candidates

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


def main(argv: list[str] | None = None) -> int:
    """`recommend --ckpt_path CKPT --input prompts.jsonl --out recs.jsonl [--generate] ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lit_dpo")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("recommend", help="recommend one candidate per prompt with a trained checkpoint")
    cmd.add_argument("--ckpt_path", required=True, help="a .ckpt written by `python -m lit_dpo fit`")
    cmd.add_argument("--input", required=True, type=Path, help="JSONL with prompt and candidates per line")
    cmd.add_argument("--out", required=True, type=Path, help="JSONL to write, one recommendation per input line")
    cmd.add_argument("--generate", action="store_true", help="also decode a greedy answer per prompt (slower)")
    cmd.add_argument("--max_new_tokens", type=int, default=32, help="length cap of the greedy answer")
    cmd.add_argument("--length_normalise", action="store_true", help="rank by mean per-token log-prob instead of the sum")
    cmd.add_argument("--no_chat_template", action="store_true", help="plain prompts (if the run used use_chat_template: false)")
    args = parser.parse_args(argv)
    try:
        records = read_prompts(args.input)
        from lit_dpo.checkpoints import load_trained_module
        from lit_dpo.models import load_tokenizer

        module = load_trained_module(args.ckpt_path, command="recommend")
        tokenizer = load_tokenizer(module.hparams.model_name_or_path, trust_remote_code=module.hparams.trust_remote_code)
        chat = not args.no_chat_template and tokenizer.chat_template is not None
        rows = recommend(
            module, tokenizer, records, generate=args.generate, max_new_tokens=args.max_new_tokens, chat=chat,
            length_normalise=args.length_normalise,
        )  # fmt: skip
    except UserInputError as error:
        print(f"lit_dpo: error: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"lit_dpo recommend: wrote {len(rows)} recommendations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
