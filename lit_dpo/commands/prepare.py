"""`lit_dpo prepare movielens`: train/val/test preference pairs from a MovieLens download (`lit_dpo.data.movielens`)."""

from __future__ import annotations

import argparse
import json

HELP = "build a dataset: prepare movielens --source DIR --out DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    movielens = datasets.add_parser("movielens", help="preference pairs from MovieLens ML-1M / ML-100K")
    movielens.add_argument("--source", required=True, help="unzipped ml-1m or ml-100k folder")
    movielens.add_argument("--out", required=True, help="output folder for train/val/test.jsonl and stats.json")
    movielens.add_argument("--min-rating", type=float, default=4.0, help="stars counted as a positive (default 4)")
    movielens.add_argument("--history-len", type=int, default=10, help="titles of history in the prompt")
    movielens.add_argument("--num-candidates", type=int, default=20, help="candidates per prompt, target included")
    movielens.add_argument("--num-negatives", type=int, default=1, help="rejected titles per example (>1: a list)")
    movielens.add_argument("--min-history", type=int, default=3, help="earlier positives a train example needs")
    movielens.add_argument("--sliding-windows", action="store_true", help="every eligible position is a train example")
    movielens.add_argument("--seed", type=int, default=0)
    movielens.add_argument(
        "--tokenizer", default="embedded:smollm2-135m-instruct",
        help="tokenizer for the token-length stats (the model you will train; 'none' to skip)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Prints the stats that are also written to `stats.json`."""
    from lit_dpo.data.movielens import prepare_movielens

    stats = prepare_movielens(
        args.source, args.out, min_rating=args.min_rating, history_len=args.history_len,
        num_candidates=args.num_candidates, num_negatives=args.num_negatives, min_history=args.min_history,
        sliding_windows=args.sliding_windows, seed=args.seed,
        tokenizer=None if args.tokenizer.lower() == "none" else args.tokenizer,
    )  # fmt: skip
    print(json.dumps(stats, indent=2))
    return 0
