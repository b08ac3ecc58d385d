"""nanoalign: multi-task LoRA fine-tuning from scratch (Align-LoRA and the multi-head LoRA family)."""

import os

# Before torch starts OpenMP (the scripts import nanoalign before torch for this): threads that spin-wait while another
# process holds a core stall every parallel op. On a shared 2-core machine a SmolLM2-135M forward took 10 s instead
# of 1.3 s; a 6-layer one on 2 threads at load ~5, median 1.41 s spinning vs 1.10 s passive. Passive waiting should
# cost little on a dedicated machine (not measured there). A policy already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .model import CausalLM, ModelConfig


def load_model(name_or_path, dtype=torch.float32, device="cpu") -> CausalLM:
    """An alias (`smollm2-135m`, `qwen2.5-0.5b`, ...), a local directory or an HF repo id -> CausalLM."""
    from .hub import resolve_model
    model = CausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype, device=device)
    model.name_or_path = str(name_or_path)  # recorded in saved adapters, so eval.py finds the base model
    return model


def load_tokenizer(name_or_path):
    """The tokenizer that belongs to a model, resolved the same way as `load_model`."""
    from .hub import resolve_model
    from .tokenizer import Tokenizer
    return Tokenizer.from_dir(resolve_model(name_or_path))


__all__ = ["CausalLM", "ModelConfig", "load_model", "load_tokenizer"]
