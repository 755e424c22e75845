"""ResumableBatchSampler with length grouping (`data.group_by_length`): deterministic, resumable, less padding."""

from __future__ import annotations

import random

import pytest

from lit_dpo.data.sampler import ResumableBatchSampler


def mixed_lengths(n: int = 400, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(20, 60), rng.randint(200, 400)]) for _ in range(n)]


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Padding tokens when each batch is padded to its longest sample."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def epoch(sampler: ResumableBatchSampler, number: int) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


def test_grouped_order_is_deterministic_and_covers_every_index_once():
    lengths = mixed_lengths(403)  # not a multiple of the batch size
    a, b = ResumableBatchSampler(403, 8, seed=3, lengths=lengths), ResumableBatchSampler(403, 8, seed=3, lengths=lengths)
    for number in range(3):
        batches = epoch(a, number)
        assert batches == epoch(b, number)  # a pure function of (seed, epoch, lengths)
        assert sorted(i for batch in batches for i in batch) == list(range(403))
        assert [len(batch) for batch in batches] == [8] * 50 + [3]  # the short batch last, as in a plain shuffle
        assert max(lengths[i] for i in batches[0]) == max(lengths)  # the largest batch first: OOM shows early
    assert epoch(a, 0) != epoch(a, 1)  # reshuffled every epoch
    assert epoch(ResumableBatchSampler(403, 8, seed=4, lengths=lengths), 0) != epoch(a, 0)


def test_grouping_cuts_padding_against_a_plain_shuffle():
    lengths = mixed_lengths()
    grouped = epoch(ResumableBatchSampler(400, 8, seed=0, lengths=lengths), 0)
    plain = epoch(ResumableBatchSampler(400, 8, seed=0), 0)
    assert padding(grouped, lengths) < 0.2 * padding(plain, lengths)


def test_resume_mid_epoch_gives_the_same_remaining_batches():
    lengths = mixed_lengths()
    full = epoch(ResumableBatchSampler(400, 8, seed=1, lengths=lengths), 2)
    interrupted = ResumableBatchSampler(400, 8, seed=1, lengths=lengths)
    interrupted.set_epoch(2)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(7)]
    resumed = ResumableBatchSampler(400, 8, seed=1, lengths=lengths)
    resumed.load_state_dict(interrupted.state_dict())
    assert seen + list(resumed) == full


def test_ddp_shards_are_disjoint_and_equal(monkeypatch):
    import lit_dpo.data.sampler as sampler_module

    lengths = mixed_lengths(100)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(sampler_module, "_world", lambda rank=rank: (rank, 3))
        shards.append(epoch(ResumableBatchSampler(100, 4, seed=0, lengths=lengths), 0))
    assert len({len(s) for s in shards}) == 1  # equal batch counts keep the collectives in step
    indices = [i for shard in shards for batch in shard for i in batch]
    assert len(indices) == len(set(indices))


def test_batch_size_one_and_evaluation_keep_the_plain_order():
    lengths = mixed_lengths(50)
    assert epoch(ResumableBatchSampler(50, 1, seed=0, lengths=lengths), 0) == epoch(ResumableBatchSampler(50, 1, seed=0), 0)
    in_order = ResumableBatchSampler(50, 4, shuffle=False, lengths=lengths)
    assert [i for batch in in_order for i in batch] == list(range(50))
    with pytest.raises(ValueError, match="lengths has 3 entries for 50 samples"):
        ResumableBatchSampler(50, 4, lengths=[1, 2, 3])


def test_data_module_groups_training_batches_by_length(tmp_path, tiny_model_dir, monkeypatch):
    import datasets

    from tests.test_data import _write_source, make_dm

    monkeypatch.setenv("LIT_DPO_CACHE", str(tmp_path / "lit_dpo_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    rng = random.Random(0)
    records = [
        {"prompt": "which movie next ? " + " ".join(["drama"] * rng.choice([1, 40])), "chosen": "the dark river",
         "rejected": "the last road"}
        for _ in range(64)
    ]
    path = _write_source("jsonl", tmp_path, records)

    def padded_tokens(**kwargs) -> int:
        dm = make_dm(tiny_model_dir, path, batch_size=4, val_fraction=0.1, **kwargs)
        return sum(int((batch["attention_mask"] == 0).sum()) for batch in dm.train_dataloader())

    assert padded_tokens(group_by_length=True) < 0.5 * padded_tokens(group_by_length=False)


def test_longest_sample_in_the_short_batch_moves_to_the_first():
    lengths = [5] * 9 + [99]  # 10 samples, batch 4: a short batch of 2 exists
    for seed in range(20):
        batches = epoch(ResumableBatchSampler(10, 4, seed=seed, lengths=lengths), 0)
        assert 9 in batches[0] and [len(b) for b in batches] == [4, 4, 2]
        assert sorted(i for b in batches for i in b) == list(range(10))
