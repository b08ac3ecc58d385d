"""The plumbing: everything the book (nanoalign/*.py, train.py, eval.py) needs to meet the world — model hub and the
embedded GGUF, tokenizer, run directory and resume, input checks and their one-line errors, fast forms, system
helpers. It imports the book; the book never imports it (tests/test_layering.py)."""

import torch

from ..model import CausalLM


def load_model(name_or_path, dtype=torch.float32, device="cpu") -> CausalLM:
    """An alias (`qwen2.5-0.5b`, ...), a local directory or an HF repo id -> CausalLM, files checked first."""
    from .hub import resolve_model
    from .model_io import load
    model = load(resolve_model(name_or_path), dtype=dtype, device=device)
    model.name_or_path = str(name_or_path)  # recorded in saved adapters, so eval.py finds the base model
    return model


def load_tokenizer(name_or_path):
    """The tokenizer that belongs to a model, resolved the same way as `load_model`."""
    from .hub import resolve_model
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve_model(name_or_path))
