"""Bad input fails before training with one line naming the key/file/row, exit code 2, and no run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lit_dpo.__main__ import main


def run_main(monkeypatch, capsys, tmp_path: Path, model_dir: str, *args: str) -> tuple[int, str]:
    argv = ["lit_dpo", "fit", f"--model.model_name_or_path={model_dir}", "--trainer.max_steps=1",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}", *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"prompt": "Pick a movie:", "chosen": "Star City", "rejected": "Dark River"})


@pytest.mark.parametrize(
    ("make_args", "expected"),
    [
        (lambda d: ["--data.train_path", str(d / "missing.jsonl")], ["data.train_path", "missing.jsonl"]),
        (lambda d: ["--data.train_path", str(write(d / "bad.jsonl", [GOOD, "{not json", GOOD]))],
         ["bad.jsonl", "line 2"]),
        (lambda d: ["--data.train_path", str(write(d / "nocol.jsonl", [json.dumps({"prompt": "p", "answer": "a", "rejected": "r"})] * 4))],
         ["nocol.jsonl", "'chosen'", "data.chosen_column"]),
        (lambda d: ["--data.train_path", str(write(d / "empty.jsonl", [GOOD, json.dumps({"prompt": "p", "chosen": " ", "rejected": "r"}), GOOD]))],
         ["empty.jsonl", "row 2", "chosen", "data.skip_invalid_rows"]),
        (lambda d: ["--data.train_path", str(write(d / "num.jsonl", [GOOD, GOOD, json.dumps({"prompt": "p", "chosen": "c", "rejected": 5})]))],
         ["num.jsonl", "row 3", "rejected"]),
        (lambda d: ["--model.loss_type", "nope"], ["model.loss_type", "sigmoid"]),
        (lambda d: ["--model.beta", "0"], ["model.beta"]),
        (lambda d: ["--model.learning_rate", "-1e-5"], ["model.learning_rate"]),
    ],
    ids=["missing-file", "malformed-jsonl", "missing-column", "empty-field", "non-string", "loss-type", "beta", "lr"],
)
def test_bad_input_gives_one_clear_line(monkeypatch, capsys, tmp_path, tiny_model_dir, make_args, expected):
    default_data = write(tmp_path / "ok.jsonl", [GOOD] * 8)
    args = make_args(tmp_path)
    if "--data.train_path" not in args:
        args = ["--data.train_path", str(default_data), *args]
    code, err = run_main(monkeypatch, capsys, tmp_path, tiny_model_dir, *args)
    assert code == 2
    error_lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, err
    for fragment in expected:
        assert fragment in error_lines[0], (fragment, error_lines[0])
    assert not list((tmp_path / "tb_logs").rglob("version_*")), "a failed run left a run directory behind"


def test_skip_invalid_rows_skips_and_trains(monkeypatch, capsys, tmp_path, tiny_model_dir):
    data = write(tmp_path / "some_bad.jsonl", [GOOD, json.dumps({"prompt": "p", "chosen": "", "rejected": "r"})] + [GOOD] * 6)
    monkeypatch.setattr(sys, "argv", ["lit_dpo", "fit", f"--model.model_name_or_path={tiny_model_dir}",
                                      f"--data.train_path={data}", "--data.skip_invalid_rows=true",
                                      "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
                                      f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}"])
    main()
    assert list((tmp_path / "tb_logs").rglob("last.ckpt"))
