"""lit_dpo.rec.scoring on a tiny random Llama: exact candidate scores, training-identical tokenization,
the full evaluate → results.json → report round trip."""

from __future__ import annotations

import json

import pytest
import torch

from lit_dpo.rec import report
from lit_dpo.rec import results as results_file
from lit_dpo.rec import scoring as ranking
from tests.full_logits import sequence_logps
from lit_dpo.data.loading import Columns
from lit_dpo.data.tokenize import tokenize_batch
from lit_dpo.errors import UserInputError
from lit_dpo.module import DPOModule

CANDIDATES = ["Star City (1999)", "Dark River (2001)", "The Last King (1977)", "Love Game"]
RECORDS = [
    {"prompt": "The user watched drama movies. Choose one: " + ", ".join(CANDIDATES), "candidates": CANDIDATES, "target": c}
    for c in CANDIDATES
]


@pytest.fixture(scope="module")
def module(tiny_model_dir):
    torch.manual_seed(0)
    module = DPOModule(model_name_or_path=tiny_model_dir, lora_dropout=0.0)
    module.configure_model()
    return module


@pytest.mark.parametrize("chat", [True, False])
def test_encoding_matches_training(tiny_tokenizer, chat):
    columns = Columns(prompt="prompt", chosen="chosen", rejected="rejected")
    batch = {"prompt": ["Which title next?"], "chosen": ["Night Road"], "rejected": ["Love Game"]}
    out = tokenize_batch(batch, tiny_tokenizer, columns, chat=chat, max_prompt_length=512, max_length=1024)
    assert ranking.encode_prompt(tiny_tokenizer, "Which title next?", chat) == out["prompt_input_ids"][0]
    assert ranking.encode_completion(tiny_tokenizer, "Night Road") == out["chosen_input_ids"][0]


def test_candidate_scores_match_full_logits(module, tiny_tokenizer):
    prompt = RECORDS[0]["prompt"]
    module.train()
    summed, counts = ranking.score_candidates(module, tiny_tokenizer, prompt, CANDIDATES, batch_size=3)
    assert module.training  # the caller's mode is restored
    module.eval()
    assert summed.shape == counts.shape == (len(CANDIDATES),)
    prompt_ids = ranking.encode_prompt(tiny_tokenizer, prompt)
    with torch.no_grad():
        for i, cand in enumerate(CANDIDATES):  # one unpadded row at a time: no padding can leak in
            completion = ranking.encode_completion(tiny_tokenizer, cand)
            ids = torch.tensor([prompt_ids + completion])
            labels = ids.clone()
            labels[0, : len(prompt_ids)] = -100
            logits = module.policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            expected, n = sequence_logps(logits, labels)
            torch.testing.assert_close(summed[i], expected[0], atol=1e-5, rtol=1e-5)
            assert counts[i].item() == n.item() == len(completion)


@pytest.mark.parametrize("batch_size", [3, 32])
def test_shared_prompt_scoring_equals_one_row_per_candidate(module, tiny_tokenizer, batch_size):
    prompt = RECORDS[0]["prompt"]
    shared = ranking.score_candidates(module, tiny_tokenizer, prompt, CANDIDATES, batch_size=batch_size)
    plain = ranking.score_candidates(module, tiny_tokenizer, prompt, CANDIDATES, batch_size=batch_size, prefix_sharing=False)
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-6)
    assert shared[1].tolist() == plain[1].tolist()


def test_generate_answer_returns_text(module, tiny_tokenizer):
    answer = ranking.generate_answer(module, tiny_tokenizer, RECORDS[0]["prompt"], max_new_tokens=5)
    assert isinstance(answer, str)
    assert "<|im_end|>" not in answer


def test_evaluate_ranking_keys_and_ranges(module, tiny_tokenizer):
    results = ranking.evaluate_ranking(module, tiny_tokenizer, RECORDS, train_targets=["Love Game"] * 3, max_new_tokens=4)
    m, pp = results["metrics"], results["per_prompt"]
    for kind in ("sum", "mean"):
        for name in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"):
            assert 0.0 <= m[f"{name}_{kind}"] <= 1.0
            assert len(pp[f"{name}_{kind}"]) == 4
    for key in ("hit@1", "valid_ratio", "hr@1_all", "hr@1_valid", "random_hr@1", "popular_hr@1"):
        assert 0.0 <= m[key] <= 1.0
    assert m["hit@1"] == m["hr@1_sum"]
    assert m["random_hr@1"] == pytest.approx(0.25)
    assert m["popular_hr@1"] == pytest.approx(0.25)  # only "Love Game" is popular: right on 1 of 4 prompts
    assert m["hr@5_sum"] == 1.0  # K = 4 < 5
    assert pp["prompt_ids"] == ["0", "1", "2", "3"] and len(pp["hit@1"]) == 4
    assert len(results["answers"]) == 4
    # the per-prompt lists average to the aggregates (same definitions)
    assert sum(pp["ndcg@10_mean"]) / 4 == pytest.approx(m["ndcg@10_mean"], abs=1e-6)


def test_biased_scores_and_answers_hit_every_target(module, tiny_tokenizer, monkeypatch):
    current = {}

    def fake_scores(module, tokenizer, prompt, candidates, **kwargs):
        target = current["target"]
        summed = torch.tensor([0.0 if c == target else -10.0 for c in candidates])
        return summed, torch.ones(len(candidates), dtype=torch.long)

    def fake_answer(module, tokenizer, prompt, max_new_tokens, use_chat_template):
        return f"I recommend {current['target']}."

    monkeypatch.setattr(ranking, "score_candidates", fake_scores)
    monkeypatch.setattr(ranking, "generate_answer", fake_answer)
    for record in RECORDS:  # one record at a time so the fakes know the target
        current["target"] = record["target"]
        m = ranking.evaluate_ranking(module, tiny_tokenizer, [record])["metrics"]
        assert m["hit@1"] == m["hr@1_mean"] == m["mrr_sum"] == m["ndcg@10_sum"] == 1.0
        assert m["valid_ratio"] == m["hr@1_all"] == m["hr@1_valid"] == 1.0


def test_bad_records_raise_user_errors(module, tiny_tokenizer):
    with pytest.raises(UserInputError, match=r"records\[0\].target"):
        ranking.evaluate_ranking(module, tiny_tokenizer, [{"prompt": "p", "candidates": ["A"], "target": "B"}])
    with pytest.raises(UserInputError, match="missing `candidates`"):
        ranking.evaluate_ranking(module, tiny_tokenizer, [{"prompt": "p", "target": "B"}])


def test_write_results_round_trips_through_report(module, tiny_tokenizer, tmp_path, monkeypatch):
    results = ranking.evaluate_ranking(module, tiny_tokenizer, RECORDS, generate=False)
    a = results_file.write_results(results, tmp_path / "dpo", run="dpo", loss_type="sigmoid", beta=0.1, learning_rate=5e-5, epochs=3)
    flipped = {**results, "per_prompt": {**results["per_prompt"], "hit@1": [1 - h for h in results["per_prompt"]["hit@1"]]}}
    results_file.write_results(flipped, tmp_path / "sft", run="sft", loss_type="sft", beta=None, learning_rate=5e-5, epochs=3)
    assert json.loads(a.read_text())["run"] == "dpo"
    assert (tmp_path / "dpo" / "results.md").read_text().startswith("# dpo")
    run = results_file.load_run(tmp_path / "dpo")
    assert run.loss_type == "sigmoid" and run.beta == 0.1 and run.epochs == 3
    assert run.metrics == pytest.approx(results["metrics"])
    assert run.per_prompt["hit@1"] == results["per_prompt"]["hit@1"]
    markdown = report.build_report([tmp_path / "dpo", tmp_path / "sft"], tmp_path / "out")
    assert "McNemar" in markdown and (tmp_path / "out" / "report.png").is_file()
