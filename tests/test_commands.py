"""One door for every command: `lit_dpo --help` lists them all, each `--help` works, and bad input to any of
them is one line and exit status 2 (the commands' own tests check their messages)."""

from __future__ import annotations

import pytest

from lit_dpo.commands import COMMANDS, LIGHTNING_COMMANDS, main

EVERY_COMMAND = [*LIGHTNING_COMMANDS, *COMMANDS]


def test_help_lists_every_command_with_a_line_each(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: lit_dpo ")
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(EVERY_COMMAND) <= listed
    assert EVERY_COMMAND == ["fit", "validate", "test", "predict", "prepare", "report", "export", "recommend", "sweep"]


@pytest.mark.parametrize("argv", [[c, "--help"] for c in EVERY_COMMAND] + [["prepare", "movielens", "--help"]],
                         ids=lambda argv: " ".join(argv[:-1]))
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith(f"usage: lit_dpo {' '.join(argv[:-1])}") or out.startswith(f"usage: lit_dpo [options] {argv[0]}")


def test_no_command_or_unknown_options_are_usage_errors(capsys):
    for argv in ([], ["export", "--ckpt_path", "x", "--out", "y", "--bogus"], ["nope"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "lit_dpo" in capsys.readouterr().err
