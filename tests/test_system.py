"""System facts (nanoalign/plumbing/system.py): the FLOPs convention against torch's own FLOP counter, the peak table,
device/dtype choices and atomic writes."""

import json
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoalign.plumbing import system
from nanoalign.adapters import apply_adapter
from nanoalign.model import CausalLM, ModelConfig
from nanoalign.plumbing.fast import install, logit_indices

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.mark.parametrize("kind", ["lora", "hydra", "rlora"])
def test_flops_per_token_counts_what_autograd_runs(kind):
    """flops_per_token x tokens equals the matmul FLOPs torch.utils.flop_counter measures for forward + backward
    (SDPA on its math kernel, so attention is counted as bmm), up to the overcount the convention states (the input
    gradient of the first block's q/k/v projections, which autograd skips: their input, from the frozen embeddings,
    needs no gradient) and R-LoRA's wasted compensation gradient. lm_head counts only at the labelled positions."""
    torch.manual_seed(0)
    model = install(apply_adapter(CausalLM(CFG), kind, rank=4, alpha=8)).train()
    B, T = 3, 10
    ids = torch.randint(1, 61, (B, T))
    at = torch.zeros(B, T, dtype=torch.bool)
    at[:, -4:] = True
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        model(ids, torch.ones(B, T, dtype=torch.bool), logits_at=logit_indices(at), right_padded=True).sum().backward()
    counted = system.flops_per_token(model, [T] * B, logit_positions=int(at.sum())) * B * T
    attn0 = model.model.layers[0].self_attn
    # every matrix that multiplies the first block's q/k/v input: W0, A, the router and R-LoRA's C_A
    first = [t for m in (attn0.q_proj, attn0.k_proj, attn0.v_proj)
             for t in (m.weight, m.lora_A.weight, getattr(getattr(m, "lora_router", None), "weight", None),
                       getattr(m, "comp_A", None))
             if t is not None]
    skipped = 2 * B * T * sum(t.numel() for t in first)
    # R-LoRA's one fused matmul [u, C_A x]·[W | −C_B]^T also computes the (discarded) weight gradient of the frozen
    # −C_B columns: work done but not model FLOPs (C_B is frozen), so the convention leaves it out
    wasted = 2 * B * T * sum(b.numel() for n, b in model.named_buffers() if n.endswith("comp_B"))
    assert skipped > 0 and (wasted > 0) == (kind == "rlora")
    assert counted - skipped + wasted == pytest.approx(fc.get_total_flops(), rel=1e-12)  # per-token division: float


def test_flops_convention_real_lengths_and_inference():
    """Attention counts Σ L_i² of the real lengths (not batch x max_len²), lm_head the positions given, and the
    inference count is the forward third of the training count for the frozen parts."""
    model = apply_adapter(CausalLM(CFG), "lora", rank=4)
    c = CFG
    d_attn = c.num_attention_heads * c.head_dim
    full = system.flops_per_token(model, [10, 10])
    ragged = system.flops_per_token(model, [10, 4])
    dense = system.flops_per_token(model, [1])  # with L = 1 (and lm_head at that token) the attention term is tiny
    # per token: dense + 12·L·d_attn·ΣL²/tokens (+ lm_head at every token, the same per token)
    attn = lambda lengths: 12 * c.num_hidden_layers * d_attn * sum(n * n for n in lengths) / sum(lengths)
    assert full - attn([10, 10]) == pytest.approx(dense - attn([1]))
    assert ragged - attn([10, 4]) == pytest.approx(dense - attn([1]))
    head = model.lm_head.weight.numel()
    assert system.flops_per_token(model, [10, 10], logit_positions=0) == pytest.approx(full - 4 * head)
    frozen = sum(p.numel() for n, p in model.named_parameters() if ".layers." in f".{n}" and p.ndim == 2
                 and not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inf = system.flops_per_token(model, [10, 10], logit_positions=0, train=False)
    assert inf == pytest.approx(2 * (frozen + lora) + 4 * c.num_hidden_layers * d_attn * 10)
    with pytest.raises(ValueError, match="real token"):
        system.flops_per_token(model, [0, 0])


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA A10G", 70e12), ("Tesla T4", None),
])
def test_peak_flops_matches_device_names(monkeypatch, name, peak):
    """torch.cuda.get_device_name() strings map to their datasheet's dense bf16 peak; specific variants (NVL,
    PCIe) win over the family name; unknown GPUs and CPUs give None."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert system.peak_flops(torch.device("cuda", 0)) == peak
    assert system.peak_flops("cpu") is None


def test_device_dtype_autocast_choices():
    """auto picks what the machine has; a CUDA request without CUDA and unknown names are one-line errors."""
    assert system.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert system.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            system.pick_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        system.pick_device("gpu0")
    assert system.base_dtype("cpu") == torch.float32 and system.base_dtype("cuda") == torch.bfloat16
    assert system.base_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        system.base_dtype("cpu", "fp8")
    assert system.use_autocast("cuda") and not system.use_autocast("cpu") and system.use_autocast("cpu", "bf16")
    assert not system.use_autocast("cuda", "off")
    assert system.peak_memory_mib("cpu") > 10   # the process's max RSS, in MiB


def test_write_atomic_replaces_whole_file_and_cleans_up(tmp_path, monkeypatch):
    """Text and bytes land complete; a failure while writing leaves the old file intact and no temporary file."""
    path = tmp_path / "out.json"
    system.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")
    system.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        system.write_atomic(path, "new text")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
