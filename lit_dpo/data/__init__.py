"""Preference data: the built-in synthetic set, file loading and validation, tokenization and batching."""

from lit_dpo.data.collate import PreferenceCollator
from lit_dpo.data.datamodule import PreferenceDataModule
from lit_dpo.data.loading import DataError
from lit_dpo.data.synthetic import generate_pairs, write_jsonl

__all__ = ["DataError", "PreferenceCollator", "PreferenceDataModule", "generate_pairs", "write_jsonl"]
