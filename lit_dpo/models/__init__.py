"""Models: where they come from (`sources`), how the policy is built (`loading`: LoRA, 4-bit), and SFT
adapters as start and reference (`adapters`). Only this package imports peft and bitsandbytes, and
`sources` imports neither, so the data side can resolve models and tokenizers without them.

Import the submodule you need; this file imports nothing, so importing `lit_dpo.models.sources`
never loads peft.
"""
