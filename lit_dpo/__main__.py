"""`python -m lit_dpo <command>`: see `python -m lit_dpo --help` and `lit_dpo.commands`."""

import sys

from lit_dpo.commands import LIGHTNING_COMMANDS, main as run_command


def main() -> None:
    status = run_command()
    # A Lightning run returns like LightningCLI does; every other command ends with its exit status.
    if status or not (sys.argv[1:2] and sys.argv[1] in LIGHTNING_COMMANDS):
        sys.exit(status)


if __name__ == "__main__":
    main()
