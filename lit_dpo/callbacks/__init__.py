"""Callbacks that watch a run and report on it (`class_path: lit_dpo.callbacks.<Name>` in YAML)."""

from lit_dpo.callbacks.diagnosis import Diagnosis
from lit_dpo.callbacks.findings import Finding
from lit_dpo.callbacks.summary import RunSummary

__all__ = ["Diagnosis", "Finding", "RunSummary"]
