"""lit_dpo: preference fine-tuning (DPO and relatives) of causal language models with PyTorch Lightning."""

__version__ = "0.1.0"
