"""`lit_dpo recommend`: one recommended movie per prompt from a trained checkpoint (`lit_dpo.rec.recommend`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "recommend one candidate per prompt with a trained checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt written by `python -m lit_dpo fit`")
    parser.add_argument("--input", required=True, type=Path, help="JSONL with prompt and candidates per line")
    parser.add_argument("--out", required=True, type=Path, help="JSONL to write, one recommendation per input line")
    parser.add_argument("--generate", action="store_true", help="also decode a greedy answer per prompt (slower)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="length cap of the greedy answer")
    parser.add_argument("--length_normalise", action="store_true", help="rank by mean per-token log-prob instead of the sum")
    parser.add_argument("--no_chat_template", action="store_true", help="plain prompts (if the run used use_chat_template: false)")


def run(args: argparse.Namespace) -> int:
    from lit_dpo.checkpoints import load_trained_module
    from lit_dpo.files import write_text
    from lit_dpo.models.sources import load_tokenizer
    from lit_dpo.rec.recommend import read_prompts, recommend

    records = read_prompts(args.input)  # bad input fails before the model loads
    module = load_trained_module(args.ckpt_path, command="recommend")
    tokenizer = load_tokenizer(module.hparams.model_name_or_path, trust_remote_code=module.hparams.trust_remote_code)
    chat = not args.no_chat_template and tokenizer.chat_template is not None
    rows = recommend(
        module, tokenizer, records, generate=args.generate, max_new_tokens=args.max_new_tokens, chat=chat,
        length_normalise=args.length_normalise,
    )  # fmt: skip
    write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"lit_dpo recommend: wrote {len(rows)} recommendations to {args.out}")
    return 0
