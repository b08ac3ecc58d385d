"""nanoalign: multi-task LoRA fine-tuning from scratch (Align-LoRA and the multi-head LoRA family)."""

import os

# Before torch starts OpenMP (the scripts import nanoalign before torch for this): threads that spin-wait while another
# process holds a core stall every parallel op. On a shared 2-core machine a SmolLM2-135M forward took 10 s instead
# of 1.3 s; a 6-layer one on 2 threads at load ~5, median 1.41 s spinning vs 1.10 s passive. Passive waiting should
# cost little on a dedicated machine (not measured there). A policy already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .model import CausalLM, ModelConfig


__all__ = ["CausalLM", "ModelConfig"]
