"""Callbacks that watch a run and report on it (`class_path: lit_dpo.callbacks.<Name>` in YAML).

They read what the module logs and what the trainer knows, never the data: the recommendation metrics,
which need the data's candidate lists, live with the recommendation wing (`lit_dpo.rec.callback`).
"""

from lit_dpo.callbacks.diagnosis import Diagnosis
from lit_dpo.callbacks.divergence import DivergenceGuard
from lit_dpo.callbacks.epoch_checkpoints import EpochCheckpoints
from lit_dpo.callbacks.findings import Finding
from lit_dpo.callbacks.memory_guard import MemoryGuard
from lit_dpo.callbacks.oscillation import OscillationDetector
from lit_dpo.callbacks.plateau import PlateauEarlyStopping
from lit_dpo.callbacks.summary import RunSummary

__all__ = [
    "Diagnosis",
    "DivergenceGuard",
    "EpochCheckpoints",
    "Finding",
    "MemoryGuard",
    "OscillationDetector",
    "PlateauEarlyStopping",
    "RunSummary",
]
