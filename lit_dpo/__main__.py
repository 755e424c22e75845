"""Entry point: `python -m lit_dpo {fit,validate,test,predict} --config configs/balanced.yaml`, and
`python -m lit_dpo prepare movielens --source DIR --out DIR` to build train/val/test JSONL from MovieLens."""

import sys

from lit_dpo.errors import UserInputError


def main() -> None:
    if sys.argv[1:2] == ["prepare"]:  # data preparation is not a Lightning subcommand
        from lit_dpo.data.movielens import main as prepare_main

        sys.exit(prepare_main(sys.argv[1:]))
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
