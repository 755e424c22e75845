"""Entry point: `python -m lit_dpo {fit,validate,test,predict} --config configs/balanced.yaml`."""

import sys

from lit_dpo.errors import UserInputError


def main() -> None:
    try:
        from lit_dpo.cli import main as cli_main

        cli_main()
    except UserInputError as error:
        # One line naming the key/file/row and the fix; no traceback for input the user must correct.
        print(f"lit_dpo: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
