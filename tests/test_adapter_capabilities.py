"""R-LoRA / M-LoRA's init compensation C is a constant (METHODS §2.5): it must not send gradient into A."""

import pytest
import torch

from nanoalign.adapters import adapter_modules, apply_adapter
from test_adapters import MLP, randomize, tiny


@pytest.mark.parametrize("kind", ["rlora", "mlora"])
def test_compensation_is_frozen(kind):
    """R-LoRA / M-LoRA's compensation C = comp_B·comp_A is a constant taken at init (METHODS §2.5): its buffers are
    graph leaves without grad, and A's gradient equals the one computed with C replaced by a detached copy (before
    the fix the buffer was a clone of lora_A with its graph, and at init M-LoRA's A gradient was exactly 0)."""
    model = randomize(apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP), std=0.2)
    m = adapter_modules(model)[0][1]
    assert all(b.is_leaf and not b.requires_grad for b in (m.comp_A, m.comp_B))
    fresh = apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP)  # at init, B_i = B_i⁰
    f = adapter_modules(fresh)[0][1]
    x = torch.randn(5, f.in_features)
    f(x).pow(2).sum().backward()
    got = f.lora_A.weight.grad.clone()
    f.lora_A.weight.grad = None
    f.comp_A, f.comp_B = f.comp_A.detach().clone(), f.comp_B.detach().clone()
    f(x).pow(2).sum().backward()
    assert torch.equal(got, f.lora_A.weight.grad) and got.abs().max() > 0
