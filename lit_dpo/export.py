"""`python -m lit_dpo export`: turn a training checkpoint into a plain Hugging Face model directory.

Checkpoints hold only the trainable weights (the LoRA adapters, see `DPOModule.on_save_checkpoint`)
plus the module's init arguments, so they are useless without lit_dpo and the base model. Exporting
rebuilds the module from those arguments, loads the adapters, folds them into the base weights
(`merge_and_unload`, W' = W + (alpha / r) · B A) and saves an ordinary safetensors directory with
its tokenizer, which `AutoModelForCausalLM.from_pretrained`, vLLM or llama.cpp's converter read
directly: evaluation and serving need neither peft nor this package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lit_dpo.checkpoints import CheckpointError, load_trained_module
from lit_dpo.errors import UserInputError
from lit_dpo.models import is_lora, load_tokenizer
from lit_dpo.module import _DTYPES


class ExportError(CheckpointError):
    """A checkpoint or output directory that cannot be exported; the message says how to fix it."""


def export_checkpoint(
    ckpt_path: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Merge a checkpoint's trained weights into its base model and save it as a HF directory.

    Args:
        ckpt_path: A `.ckpt` written by `python -m lit_dpo fit` (LoRA or `finetuning: full`).
        out: Directory to write `config.json`, `model.safetensors` and the tokenizer files into.
        dtype: Weight dtype of the saved model (float32, bfloat16, float16); None keeps the
            training dtype. The merge itself always runs in the training dtype.
        overwrite: Replace `out` when it exists and is not empty.

    Returns:
        The output directory.

    Raises:
        ExportError: Missing or foreign checkpoint, adapter keys that do not match the model the
            checkpoint's settings build, an unknown dtype, or a non-empty `out` without `overwrite`.
    """
    ckpt_path, out = Path(ckpt_path).expanduser(), Path(out).expanduser()
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"export --dtype: unknown dtype '{dtype}'; choose one of: {', '.join(_DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"export --out: {out} exists and is not empty; choose another directory or pass --overwrite")
    # Merging adds B A to W; a 4-/8-bit W cannot hold the sum, so the base is loaded unquantized.
    module = load_trained_module(ckpt_path, command="export", quantized=False)
    # only the trained adapter; a frozen `reference` adapter (init_adapter runs) is dropped, not merged
    model = module.policy.merge_and_unload(adapter_names=["default"]) if is_lora(module.policy) else module.policy
    model.eval()
    model.config.use_cache = True  # training turned the KV cache off; generation wants it back
    if dtype is not None:
        model.to(_DTYPES[dtype])
        model.config.dtype = _DTYPES[dtype]
    tokenizer = load_tokenizer(module.hparams.model_name_or_path, trust_remote_code=module.hparams.trust_remote_code)

    # Write into a temporary sibling and swap it in: a failed export never leaves a half-written model,
    # and overwriting never keeps stale shards from a previous export next to the new ones.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """`export --ckpt_path PATH --out DIR [--overwrite] [--dtype D]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lit_dpo")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="merge a checkpoint into a plain Hugging Face model directory")
    export.add_argument("--ckpt_path", required=True, help="a .ckpt written by `python -m lit_dpo fit`")
    export.add_argument("--out", required=True, help="directory for the merged model and its tokenizer")
    export.add_argument("--overwrite", action="store_true", help="replace --out when it is not empty")
    export.add_argument("--dtype", choices=list(_DTYPES), default=None, help="saved weight dtype (default: as trained)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt_path, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except UserInputError as error:
        print(f"lit_dpo: error: {error}", file=sys.stderr)
        return 2
    print(f"lit_dpo export: wrote the merged model and tokenizer to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
