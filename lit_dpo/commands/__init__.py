"""`python -m lit_dpo <command>`: one door for every command, one argparse shell, one error handler.

Lightning's `fit`, `validate`, `test` and `predict` are LightningCLI's (`lit_dpo.cli`, its own parser with
every config key); the other commands are the modules of this package. Each of them has a `HELP` line,
`add_arguments(parser)` and `run(args) -> exit status`, and takes no `sys.argv` of its own: the shell parses,
and a `UserInputError` from any command (a bad file, row, option or config key) becomes one line
`lit_dpo: error: ...` and exit status 2, here for all of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lit_dpo.commands import export, prepare, recommend, report, sweep
from lit_dpo.errors import UserInputError

PROG = "lit_dpo"
DESCRIPTION = "Preference fine-tuning (DPO and its relatives) of causal language models with PyTorch Lightning."
LIGHTNING_COMMANDS = {
    "fit": "train: fit --config configs/balanced.yaml (Lightning; `fit --help` lists every config key)",
    "validate": "pair metrics of a checkpoint on the validation split (Lightning)",
    "test": "pair and ranking metrics of a checkpoint on the test split -> results.json (Lightning)",
    "predict": "per-pair losses, rewards and log-probs (Lightning's predict loop)",
}
COMMANDS = {"prepare": prepare, "report": report, "export": export, "recommend": recommend, "sweep": sweep}


def build_parser() -> argparse.ArgumentParser:
    """The shell: `lit_dpo` with one subcommand per command, Lightning's listed for `--help`."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     epilog=f"{PROG} COMMAND --help shows a command's options.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_line in LIGHTNING_COMMANDS.items():
        subcommands.add_parser(name, help=help_line, add_help=False)  # never parsed here: see main()
    for name, command in COMMANDS.items():
        command.add_arguments(subcommands.add_parser(name, help=command.HELP, description=command.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command named by `argv[0]`; returns its exit status (2 for bad input, with one error line).

    `fit`/`validate`/`test`/`predict` go to LightningCLI with the rest of `argv` (None: `sys.argv`).
    """
    given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in LIGHTNING_COMMANDS:
        return guarded(lambda: run_lightning(given))
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    unknown = [arg for arg in unknown if arg != "--"]
    if unknown and not getattr(command, "FORWARDS_UNKNOWN_ARGUMENTS", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown = unknown
    return guarded(lambda: command.run(args))


def run_lightning(argv: list[str] | None) -> int:
    """`fit`/`validate`/`test`/`predict` through LightningCLI; argv None reads `sys.argv` (LightningCLI
    warns when it is given arguments while the process has command-line arguments of its own)."""
    from lit_dpo.cli import LitDPOCLI

    LitDPOCLI(args=argv)
    return 0


def guarded(run: Callable[[], int]) -> int:
    """`run()`'s exit status; a `UserInputError` (also one raised inside jsonargparse, which wraps what it
    instantiates) prints as one line and gives 2. Anything else is a bug and keeps its traceback."""
    try:
        return run()
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, UserInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return 2
