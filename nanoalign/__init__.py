"""nanoalign: multi-task LoRA fine-tuning from scratch (Align-LoRA and the multi-head LoRA family)."""

import os

# Before torch starts OpenMP (hence the scripts import nanoalign first): threads that spin-wait while another process
# holds a core stall every parallel op on a shared machine. A policy already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .model import CausalLM, ModelConfig


__all__ = ["CausalLM", "ModelConfig"]
