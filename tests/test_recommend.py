"""`python -m lit_dpo recommend`: one candidate per prompt from a checkpoint, JSONL in and out."""

from __future__ import annotations

import json

import pytest
import torch

from lit_dpo.commands import main
from tests.test_adapters import _sft_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "trained.ckpt"
    _sft_checkpoint(tiny_model_dir, path)
    return path


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_recommends_one_candidate_per_prompt_in_input_order(checkpoint, tmp_path, capsys):
    rows = [
        {"user_id": 7, "prompt": "The user watched drama. Choose one:", "candidates": ["Star City (1999)", "Dark River"]},
        {"prompt": "history: comedy. candidates: A, B, C", "candidates": ["A", "B", "C"]},
    ]
    out = tmp_path / "recs.jsonl"
    code = main(["recommend", "--ckpt_path", str(checkpoint), "--input", str(_write(tmp_path / "in.jsonl", rows)),
                 "--out", str(out), "--generate", "--max_new_tokens", "4"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in recs] == ["7", "2"]  # id carried through, else the line number
    for rec, row in zip(recs, rows):
        assert sorted(rec["ranking"]) == sorted(row["candidates"])
        assert rec["recommendation"] == rec["ranking"][0]
        assert rec["scores"] == sorted(rec["scores"], reverse=True)
        assert isinstance(rec["answer"], str) and rec["answer_candidate"] in (None, *row["candidates"])


def test_recommendation_is_the_most_likely_candidate(checkpoint, tmp_path, tiny_tokenizer):
    from lit_dpo.checkpoints import load_trained_module
    from lit_dpo.rec.scoring import score_candidates

    prompt, candidates = "Choose one movie:", ["Night Road", "The Last King (1977)", "A"]
    module = load_trained_module(checkpoint, command="recommend")
    summed, _ = score_candidates(module, tiny_tokenizer, prompt, candidates)
    out = tmp_path / "recs.jsonl"
    main(["recommend", "--ckpt_path", str(checkpoint), "--input",
          str(_write(tmp_path / "in.jsonl", [{"prompt": prompt, "candidates": candidates}])), "--out", str(out)])  # fmt: skip
    rec = json.loads(out.read_text())
    assert rec["recommendation"] == candidates[int(torch.argmax(summed))]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "in.jsonl:2: not valid JSON"),
        (json.dumps({"prompt": "p"}), "in.jsonl:2: `candidates` must be a non-empty list"),
        (json.dumps({"prompt": " ", "candidates": ["A"]}), "in.jsonl:2: `prompt` missing"),
        (json.dumps({"prompt": "p", "candidates": []}), "in.jsonl:2: `candidates` must be a non-empty list"),
    ],
)
def test_bad_input_names_file_and_line(checkpoint, tmp_path, capsys, line, message):
    good = json.dumps({"prompt": "p", "candidates": ["A"]})
    path = _write(tmp_path / "in.jsonl", [good, line])
    code = main(["recommend", "--ckpt_path", str(checkpoint), "--input", str(path), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    path = _write(tmp_path / "in.jsonl", [{"prompt": "p", "candidates": ["A"]}])
    code = main(["recommend", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--input", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and "recommend --ckpt_path: not found" in capsys.readouterr().err
