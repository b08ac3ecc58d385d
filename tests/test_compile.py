"""torch.compile of the training forward (nanoalign/model.py + adapters.py with the fast forms training installs,
nanoalign/plumbing/fast.py), on CPU with the aot_eager backend (dynamo + AOTAutograd, forward and backward graphs,
no C++ compiler): one graph, no recompiles, and the same alignment-loss gradients as eager, with and without
gradient checkpointing."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from nanoalign.adapters import adapter_context, apply_adapter
from nanoalign.model import CausalLM, ModelConfig
from nanoalign.plumbing.fast import alignment_loss, install, logit_indices

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
TASKS = 3


def tiny(kind, ckpt):
    torch.manual_seed(0)
    model = install(apply_adapter(CausalLM(CFG), kind, rank=4, alpha=8, heads=3, num_tasks=TASKS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)   # B = 0 at init would hide every path through B
    model.gradient_checkpointing = ckpt
    return model.train()


def batch(seed):
    """A right-padded batch as the trainer builds it: 2 examples per task, labels on the last real tokens; the
    host-side facts (right padding, flat logit indices) computed on the CPU batch."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 12
    ids = torch.randint(1, 61, (B, T), generator=g)
    lengths = torch.tensor([12, 9, 11, 7, 10, 12])
    mask = torch.arange(T)[None] < lengths[:, None]
    at = mask & (torch.arange(T)[None] >= lengths[:, None] - 4) & (torch.arange(T)[None] < lengths[:, None] - 1)
    targets = ids[:, 1:][at[:, :-1]]
    return ids, mask, logit_indices(at), targets, torch.arange(B) % TASKS


def step(model, fwd, b, kind="kl"):
    """CE + alignment loss, backward inside the context (a checkpointed block re-runs its adapters there)."""
    ids, mask, idx, targets, tasks = b
    with adapter_context(model, task_ids=tasks, collect=True) as ctx:
        logits = fwd(ids, mask, idx)
        la = alignment_loss(ctx.a_outputs, mask, tasks, kind=kind, num_tasks=TASKS)
        loss = F.cross_entropy(logits, targets) + la
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return la.detach(), grads, len(ctx.a_outputs)


def forward_fn(model, right_padded=True):
    return lambda ids, mask, idx: model(ids, mask, logits_at=idx, right_padded=right_padded)


@pytest.mark.parametrize("kind", ["align", "rlora", "mtl"])
def test_compiled_checkpointed_forward_is_one_graph(kind, one_thread):
    """With gradient checkpointing and A-outputs collected, dynamo traces the whole forward as one graph (the
    blocks return their A-outputs instead of writing them into the context, which a checkpointed region may not
    do); also when padding is left undecided (right_padded=None). fullgraph=True then runs forward + backward,
    a second step with a new context, new values and another task order compiles nothing new, and new sequence
    lengths compile one dynamic-shape graph, not one per length."""
    torch._dynamo.reset()
    model = tiny(kind, ckpt=True)
    b = batch(0)
    for right_padded in (True, None):
        with adapter_context(model, task_ids=b[4], collect=True) as ctx:
            explain = torch._dynamo.explain(forward_fn(model, right_padded))(*b[:3])
        assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
        assert len(ctx.a_outputs) == 14
    if kind == "rlora":
        return  # compiled forward + backward of rlora: test_alignment_gradients_same_compiled_and_checkpointed
    torch._dynamo.reset()
    fwd = torch.compile(forward_fn(model), backend="aot_eager", fullgraph=True)
    la, grads, n = step(model, fwd, b)
    assert n == 14 and la > 0 and all(g.abs().sum() > 0 for k, g in grads.items() if "lora_A" in k)
    b2 = batch(1)
    b2 = (*b2[:4], b2[4].flip(0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(model, fwd, b2)
    if kind == "align":  # new lengths: one recompile with dynamic shapes, then none (no graph per length)
        from torch._dynamo.utils import counters
        before = counters["stats"]["unique_graphs"]
        for T in (9, 11, 15):  # the sequence length and the number of logits both change
            ids, tasks = torch.randint(1, 61, (6, T)), b[4]
            mask = torch.ones(6, T, dtype=torch.bool)
            at = torch.zeros_like(mask)
            at[:, T // 2:-1] = True
            step(model, fwd, (ids, mask, logit_indices(at), ids[:, 1:][at[:, :-1]], tasks))
        assert counters["stats"]["unique_graphs"] - before == 1


@pytest.mark.parametrize("kind,loss", [("align", "kl"), ("rlora", "mmd")])
def test_alignment_gradients_same_compiled_and_checkpointed(kind, loss, one_thread):
    """The alignment loss and every adapter gradient are the same in eager mode without checkpointing (the
    reference), with checkpointing, compiled (aot_eager), and compiled with checkpointing."""
    b = batch(2)
    results = {}
    for ckpt in (False, True):
        for compiled in (False, True):
            torch._dynamo.reset()
            model = tiny(kind, ckpt)
            fwd = forward_fn(model)
            if compiled:
                fwd = torch.compile(fwd, backend="aot_eager", fullgraph=True)
            results[(ckpt, compiled)] = step(model, fwd, b, loss)
    ref_loss, ref, _ = results[(False, False)]
    for key, (la, grads, _) in results.items():
        torch.testing.assert_close(la, ref_loss, rtol=1e-6, atol=1e-7, msg=str(key))
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], rtol=1e-5, atol=1e-7, msg=f"{key} {n}")
