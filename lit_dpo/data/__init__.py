"""Preference data: the built-in synthetic set, file loading and validation, tokenization and batching.

Nothing here knows the model: what only the model side knows (its attention backend, its reference
log-probs) reaches the data module through `PreferenceDataModule.connect`.
"""

from lit_dpo.data.collate import PreferenceCollator
from lit_dpo.data.datamodule import PreferenceDataModule
from lit_dpo.data.loading import DataError
from lit_dpo.data.synthetic import generate_pairs

__all__ = ["DataError", "PreferenceCollator", "PreferenceDataModule", "generate_pairs"]
