"""`lit_dpo export`: a training checkpoint as a plain Hugging Face model directory (`lit_dpo.checkpoints`)."""

from __future__ import annotations

import argparse

HELP = "merge a checkpoint into a plain Hugging Face model directory"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # lit_dpo.models.loading.DTYPES, without importing torch here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt written by `python -m lit_dpo fit`")
    parser.add_argument("--out", required=True, help="directory for the merged model and its tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it is not empty")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="saved weight dtype (default: as trained)")


def run(args: argparse.Namespace) -> int:
    from lit_dpo.checkpoints import export_checkpoint

    out = export_checkpoint(args.ckpt_path, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"lit_dpo export: wrote the merged model and tokenizer to {out}")
    return 0
