"""`PreferenceDataModule`: preference pairs from a file (or the built-in synthetic set) to padded batches.

Pipeline, per split: read and validate (`loading.py`) -> tokenize prompt and completions with the policy's
tokenizer and fit each pair into `max_length` (`tokenize.py`, cached by `datasets`) -> batch in the
shared-prompt or the plain layout (`shared_prompt.py`, `collate.py`).

What only the model side knows is given to the data module before its loaders are built, with `connect`
(as litgpt's `DataModule.connect(tokenizer=...)`): whether the model's attention takes the shared-prompt
layout's custom mask, and how to compute reference log-probs, which then travel with the rows as a
`reference_logps` column (`lit_dpo.reference_cache`).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_dpo.data.collate import REFERENCE_KEY, PreferenceCollator
from lit_dpo.data.loading import Columns, DataError, Source, check_path, digest, load_source, saved_splits
from lit_dpo.data.sampler import ResumableBatchSampler
from lit_dpo.data.shared_prompt import SharedPromptCollator
from lit_dpo.data.synthetic import GENERATOR_VERSION, generate_pairs
from lit_dpo.data.tokenize import tokenize_split
from lit_dpo.files import cache_root, write_jsonl
from lit_dpo.models.sources import load_tokenizer

SYNTHETIC_SEED = 0  # the built-in set stays the same across `seed`s, so runs with different seeds compare
ReferenceLogpsFn = Callable[[str, datasets.Dataset, str, Callable, int], "torch.Tensor | None"]
"""`(split, rows, fingerprint, collator, batch_size) -> [N, A] reference log-probs` (or None: not available);
`lit_dpo.reference_cache.ReferenceLogps` is the one lit_dpo uses."""


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs (prompt, chosen, rejected) for DPO-style training, tokenized and batched.

    Batches come from `SharedPromptCollator` (`prefix_sharing`, the default: one row per prompt holding the
    prompt and all its answers, see `lit_dpo.data.shared_prompt`) or `PreferenceCollator` (plain: [A·B, T],
    B prompt+chosen rows, then B prompt+rejected rows per rejected answer), plus any extra per-pair columns
    such as `candidates`. `rejected` may hold K answers per prompt (a list of K strings) for the sdpo loss.

    Args:
        train_path: Training pairs: a .jsonl/.json/.parquet/.csv file or a `save_to_disk` directory (a
            DatasetDict uses its "train" split, and its "validation" split when val_path is unset). None
            uses the built-in synthetic movie-recommendation set, written once as JSONL to the cache dir.
        val_path: Separate validation pairs (same formats); None splits val_fraction off the training data.
        test_path: Pairs for `test`/`predict`; None reuses the validation data.
        val_fraction: Share of the training data held out for validation when val_path is None (seeded split).
        tokenizer_name_or_path: Tokenizer to encode with; must match the policy (the CLI links it to
            model.model_name_or_path). A local HF directory, hub id, .gguf file or embedded:<name> alias.
        prompt_column: Column holding the prompt text.
        chosen_column: Column holding the preferred completion.
        rejected_column: Column holding the dispreferred completion.
        use_chat_template: Wrap each prompt as a user turn with the tokenizer's chat template plus the
            assistant header; falls back to the plain prompt when the tokenizer has no template.
        max_prompt_length: Prompt tokens kept (from the end) before fitting the pair into max_length.
        max_length: Longest prompt + completion in tokens; prompts are cut further to fit, completions never.
        batch_size: Preference pairs per training batch (the forward pass sees batch_size rows with prefix_sharing,
            else (1 + K) * batch_size rows for K rejected answers per pair).
        eval_batch_size: Pairs per validation/test/predict batch; None uses batch_size.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        skip_invalid_rows: Skip rows whose prompt/chosen/rejected is missing, not a string or blank (counted
            and logged) instead of stopping with an error naming the first such row.
        synthetic_num_pairs: Pairs in the built-in synthetic set (train + validation), used when train_path is None.
        synthetic_history_len: Movies in each synthetic user's viewing history.
        synthetic_num_candidates: Titles in each synthetic candidate list (the target included).
        seed: Seed of the train/validation split and of the training-order shuffle.
        group_by_length: Put pairs of similar length (prompt + longest answer) into the same training
            batch, to cut padding: shuffled mega-batches of up to 50 batches are sorted by length, then
            the batches are shuffled (see `sampler.length_grouped_batches`). Only matters for
            batch_size > 1; the order stays seeded and resumable.
        trust_remote_code: Allow custom tokenizer code from the tokenizer's repository.
        prefix_sharing: Batch in the shared-prompt layout (one row per prompt: prompt, chosen, rejected...;
            `lit_dpo.data.shared_prompt`), which gives the same log-probs as the plain layout for about half
            the compute on long prompts. False gives the plain layout (one prompt copy per answer).
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.1,
        tokenizer_name_or_path: str = "embedded:smollm2-135m-instruct",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        use_chat_template: bool = True,
        max_prompt_length: int = 512,
        max_length: int = 1024,
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        skip_invalid_rows: bool = False,
        synthetic_num_pairs: int = 64,
        synthetic_history_len: int = 10,
        synthetic_num_candidates: int = 10,
        seed: int = 42,
        trust_remote_code: bool = False,
        prefix_sharing: bool = True,
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        self._train_sampler: ResumableBatchSampler | None = None
        self._sampler_state_to_load: dict | None = None
        self._custom_attention_mask = True  # see connect()
        self._reference_logps: ReferenceLogpsFn | None = None
        self._with_reference_column: dict[str, datasets.Dataset] = {}  # per split, since the last connect()
        # Cheap checks first, so a typo fails before the trainer creates a run directory.
        for key, path in (("train_path", train_path), ("val_path", val_path), ("test_path", test_path)):
            if path is not None:
                check_path(key, path)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}; 0.1 is typical")
        for key, value, minimum in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_prompt_length", max_prompt_length, 1),
            ("max_length", max_length, 2),
        ):
            if value is not None and value < minimum:
                raise DataError(f"data.{key} must be >= {minimum}, got {value}")
        if max_prompt_length >= max_length:
            raise DataError(
                f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length ({max_length}), "
                "which also has to hold the completion; raise max_length or lower max_prompt_length"
            )
        if len({prompt_column, chosen_column, rejected_column}) < 3:
            raise DataError(
                "data.prompt_column, data.chosen_column and data.rejected_column must name three different columns, "
                f"got {prompt_column!r}, {chosen_column!r}, {rejected_column!r}"
            )
        if train_path is None:
            if synthetic_num_pairs < 2:
                raise DataError(f"data.synthetic_num_pairs must be >= 2 (train + val), got {synthetic_num_pairs}")
            try:
                generate_pairs(0, history_len=synthetic_history_len, num_candidates=synthetic_num_candidates)
            except ValueError as err:
                raise DataError(f"data.synthetic_history_len/synthetic_num_candidates: {err}") from err

        self.train_path = train_path
        self.val_path = val_path
        self.test_path = test_path
        self.val_fraction = val_fraction
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.columns = Columns(prompt_column, chosen_column, rejected_column)
        self.use_chat_template = use_chat_template
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.skip_invalid_rows = skip_invalid_rows
        self.synthetic_num_pairs = synthetic_num_pairs
        self.synthetic_history_len = synthetic_history_len
        self.synthetic_num_candidates = synthetic_num_candidates
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.prefix_sharing = prefix_sharing
        self.group_by_length = group_by_length

        self.tokenizer = None
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.stats: dict[str, dict[str, float | int]] = {}
        """Per split ("train", "val", "test"): pairs, dropped_too_long, skipped_invalid, identical_pairs,
        truncated_prompts, prompt_tokens_mean/max, completion_tokens_mean/max (the longest of chosen and the
        rejected answers)."""
        self.negatives: dict[str, int] = {}
        """K, rejected answers per prompt, for each loaded file with K > 1 (e.g. {"data.train_path x.jsonl": 3})."""
        self.pair_lengths: dict[str, np.ndarray] = {}
        """Per split: tokens of each kept pair, prompt + longest answer (for length-grouped batches)."""
        self.fingerprints: dict[str, str] = {}
        """Per split: what identifies its tokenized rows (source file, split, tokenizer, settings)."""
        self._is_setup = False

    def connect(self, *, custom_attention_mask: bool = True, reference_logps: ReferenceLogpsFn | None = None) -> None:
        """Give the data module what the model side knows, before the loaders are built.

        Args:
            custom_attention_mask: Whether the model's attention backend takes the shared-prompt layout's
                custom 4D mask (`lit_dpo.forward.takes_custom_mask`); without it batches take the plain
                layout whatever `prefix_sharing` says.
            reference_logps: Computes (or loads) the reference log-probs of a split's rows; each loader then
                carries them as a `reference_logps` column, stacked into a [B, A] batch tensor that
                `DPOModule.reference_logps` uses instead of a reference forward. None: the reference runs
                every step.
        """
        self._custom_attention_mask = custom_attention_mask
        self._reference_logps = reference_logps
        self._with_reference_column = {}

    @override
    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: write the synthetic file here so ranks do not race.
        self.train_source()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._is_setup:  # Lightning calls setup once per stage (fit, then test...); build everything once
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name_or_path, trust_remote_code=self.trust_remote_code)
        if self.tokenizer.eos_token_id is None:
            raise DataError(
                f"data.tokenizer_name_or_path: tokenizer {self.tokenizer_name_or_path} has no EOS token, "
                "which ends every completion; use a tokenizer that defines one"
            )
        train_path = self.train_source()
        train = self._load("train_path", train_path, ("train",))
        if self.val_path is not None:
            val = self._load("val_path", self.val_path, ("validation", "train"))
        elif Path(train_path).is_dir() and "validation" in saved_splits(Path(train_path)):
            val = self._load("train_path", train_path, ("validation",))
        else:
            train, val = self._split(train)
        test = self._load("test_path", self.test_path, ("test", "validation")) if self.test_path else None

        self.train_dataset = self._prepare_split("train", "train_path", train)
        self.val_dataset = self._prepare_split("val", "val_path" if self.val_path else "train_path", val)
        if test is None:
            self.test_dataset, self.stats["test"] = self.val_dataset, self.stats["val"]
            self.fingerprints["test"] = self.fingerprints["val"]
        else:
            self.test_dataset = self._prepare_split("test", "test_path", test)
        self._is_setup = True

    @override
    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self._with_reference("train"))

    @override
    def state_dict(self) -> dict:
        """Where the training order stands (epoch, batches done), saved in every checkpoint."""
        return {"train_sampler": self._train_sampler.state_dict()} if self._train_sampler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores the data module before it builds the train loader; apply it there.
        self._sampler_state_to_load = state_dict.get("train_sampler")
        if self._sampler_state_to_load is not None:
            # Lightning's mid-epoch warning looks for a stateful DataLoader and cannot see that this
            # data module resumes the order itself (tests/test_training.py proves the resume exact).
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    @override
    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._with_reference("val"))

    @override
    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._with_reference("test"))

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._with_reference("test"))

    @property
    def collator(self) -> PreferenceCollator | SharedPromptCollator:
        """The batch builder of the layout in use (needs the tokenizer, so only after `setup`)."""
        shared = self.prefix_sharing and self._custom_attention_mask
        return (SharedPromptCollator if shared else PreferenceCollator)(pad_token_id=self.tokenizer.pad_token_id)

    def column_values(self, split: str, column: str) -> list | None:
        """All values of an extra column (e.g. the training `target`s for the popularity baseline), or None."""
        dataset = self._splits()[split]
        if dataset is None or column not in dataset.column_names:
            return None
        return dataset[column]

    def _splits(self) -> dict[str, datasets.Dataset | None]:
        return {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}

    def _with_reference(self, split: str) -> datasets.Dataset | None:
        """The split's rows, with their `reference_logps` column when `connect` gave a way to compute it."""
        rows = self._splits()
        if self._reference_logps is None or not rows[split]:
            return rows[split]
        # fit computes train before val, whichever loader Lightning asks for first (with max_steps it builds
        # the val loader first), so a fit reads the same way every time
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING and split in ("train", "val")
        for name in ("train", "val") if fitting else (split,):
            if name not in self._with_reference_column and rows[name]:
                self._with_reference_column[name] = self._attach_reference(name, rows[name])
        return self._with_reference_column[split]

    def _attach_reference(self, split: str, dataset: datasets.Dataset) -> datasets.Dataset:
        logps = self._reference_logps(split, dataset, self.fingerprints[split], self.collator, self.eval_batch_size)
        if logps is None:
            return dataset
        values = hashlib.sha256(logps.float().numpy().tobytes()).hexdigest()
        # float64 holds every float32 exactly; the collator turns the column back into float32
        return dataset.add_column(REFERENCE_KEY, logps.double().tolist(),
                                  new_fingerprint=digest({"rows": self.fingerprints[split], "reference": values}))

    def _train_loader(self, dataset: datasets.Dataset) -> DataLoader:
        # Order depends on (seed, epoch) only, never on global RNG, and resumes mid-epoch (sampler.py).
        lengths = self.pair_lengths.get("train") if self.group_by_length else None
        self._train_sampler = ResumableBatchSampler(
            len(dataset), self.batch_size, seed=self.seed, lengths=None if lengths is None else lengths.tolist()
        )
        if self._sampler_state_to_load is not None:  # resuming: continue where the checkpoint stopped
            self._train_sampler.load_state_dict(self._sampler_state_to_load)
            self._sampler_state_to_load = None
        return DataLoader(
            dataset,
            batch_sampler=self._train_sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def _eval_loader(self, dataset: datasets.Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def train_source(self) -> str:
        """The training file: train_path, or the synthetic set (generated into the cache on first use)."""
        if self.train_path is not None:
            return self.train_path
        settings = {
            "num_pairs": self.synthetic_num_pairs,
            "seed": SYNTHETIC_SEED,
            "history_len": self.synthetic_history_len,
            "num_candidates": self.synthetic_num_candidates,
            "generator_version": GENERATOR_VERSION,
        }
        path = cache_root() / "synthetic" / f"{digest(settings)[:16]}.jsonl"
        if not path.is_file():
            records = generate_pairs(
                self.synthetic_num_pairs, SYNTHETIC_SEED, self.synthetic_history_len, self.synthetic_num_candidates
            )
            write_jsonl(records, path)
            rank_zero_info(f"Wrote {len(records)} synthetic preference pairs to {path}")
        return str(path)

    def _load(self, key: str, path: str, splits: tuple[str, ...]) -> Source:
        source = load_source(key, path, self.columns, self.skip_invalid_rows, splits)
        if source.negatives > 1:
            self.negatives[f"data.{key} {path}"] = source.negatives
        return source

    def _split(self, train: Source) -> tuple[Source, Source]:
        try:
            parts = train.dataset.train_test_split(test_size=self.val_fraction, seed=self.seed)
        except ValueError as err:  # too few rows for this fraction
            raise DataError(
                f"data.val_fraction: cannot split {len(train.dataset)} training pairs with val_fraction="
                f"{self.val_fraction} ({err}); add pairs, change val_fraction or give data.val_path"
            ) from err
        cut = {"val_fraction": self.val_fraction, "seed": self.seed}
        return train.part(parts["train"], "train", **cut), train.part(parts["test"], "validation", **cut)

    def _prepare_split(self, split: str, key: str, source: Source) -> datasets.Dataset:
        """Tokenize and fit one split, record its stats, and drop pairs that cannot fit."""
        tokenizer = self.tokenizer
        chat = self.use_chat_template and tokenizer.chat_template is not None
        if self.use_chat_template and not chat:
            rank_zero_warn(f"Tokenizer {self.tokenizer_name_or_path} has no chat template; using plain prompts.")
        dataset, counts, lengths, self.fingerprints[split] = tokenize_split(
            source.dataset, source.fingerprint, tokenizer, self.columns, chat=chat,
            max_prompt_length=self.max_prompt_length, max_length=self.max_length, split=split, key=key,
        )  # fmt: skip
        stats = {"pairs": counts.pop("pairs"), "dropped_too_long": counts.pop("dropped_too_long"),
                 "skipped_invalid": source.skipped_invalid, **counts}
        self.stats[split] = stats
        self.pair_lengths[split] = lengths
        rank_zero_info(
            f"{split}: {stats['pairs']} pairs ({stats['dropped_too_long']} dropped as too long, "
            f"{stats['skipped_invalid']} invalid rows skipped); prompt tokens mean {stats['prompt_tokens_mean']:.1f} "
            f"max {stats['prompt_tokens_max']}, {stats['truncated_prompts']} truncated; completion tokens max "
            f"{stats['completion_tokens_max']}"
        )
        if stats["identical_pairs"]:
            rank_zero_warn(
                f"{split}: {stats['identical_pairs']} pairs have chosen == rejected (or == one of their rejected "
                "answers); they carry no preference signal"
            )
        return dataset
