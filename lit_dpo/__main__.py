"""Entry point: `python -m lit_dpo {fit,validate,test,predict} --config configs/balanced.yaml`, and
`python -m lit_dpo prepare movielens --source DIR --out DIR` (train/val/test JSONL from MovieLens) and
`python -m lit_dpo report RUN_DIR [RUN_DIR ...]` (comparison table, CIs, McNemar) and
`python -m lit_dpo export --ckpt_path CKPT --out DIR` (LoRA merged into a plain Hugging Face model) and
`python -m lit_dpo recommend --ckpt_path CKPT --input prompts.jsonl --out recs.jsonl` (one movie per prompt) and
`python -m lit_dpo sweep --config CFG --grid model.beta=0.05,0.1` (ablations, tables, plots)."""

import sys

from lit_dpo.errors import UserInputError


# Subcommands that are not Lightning's: module whose `main(argv)` takes the arguments from the name on.
TOOLS = {
    "prepare": "lit_dpo.data.movielens",
    "report": "lit_dpo.report",
    "export": "lit_dpo.export",
    "recommend": "lit_dpo.recommend",
    "sweep": "lit_dpo.sweep",
}


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in TOOLS:
        import importlib

        sys.exit(importlib.import_module(TOOLS[sys.argv[1]]).main(sys.argv[1:]))
    try:
        from lit_dpo.cli import main as cli_main

        cli_main()
    except Exception as error:
        # One line naming the key/file/row and the fix; no traceback for input the user must correct.
        # jsonargparse wraps errors raised while it builds callbacks, so look through the causes.
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"lit_dpo: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
