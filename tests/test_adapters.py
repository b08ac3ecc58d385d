"""Adapters (nanoalign/adapters.py) against METHODS.md's equations, written out as naive per-head loops over dense
matrices; parameter counts against METHODS §1; each adapter's forward is its own. (Files and PEFT export:
tests/test_adapter_io.py.)"""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoalign.adapters import (KINDS, AdapterLinear, HydraLoRALinear, HydraNoRouterLinear, LoRALinear, MLoRALinear,
                                MTLLoRALinear, MultiLoRALinear, RLoRALinear, adapter_context, adapter_modules,
                                apply_adapter, count_trainable, merge_adapters, rank_for_budget, route)
from nanoalign.plumbing.adapter_io import apply_adapter_checked
from experiments.analysis import head_cosine_similarity
from nanoalign.model import CausalLM, ModelConfig

IN, OUT, R, N, T = 12, 10, 4, 3, 3

CASES = {  # name: (class, options)
    "lora": (LoRALinear, {}),
    "lora-rslora": (LoRALinear, {"rank_stabilized": True}),
    "hydra": (HydraLoRALinear, {}),
    "hydra-norouter": (HydraNoRouterLinear, {}),
    "hydra-norouter-mean": (HydraNoRouterLinear, {"head_reduction": "mean"}),
    "rlora": (RLoRALinear, {}),
    "rlora-code": (RLoRALinear, {"code_faithful": True}),
    "rlora-mt-only": (RLoRALinear, {"random_init": False}),         # R-LoRA ablation "+MT" (METHODS §6.1 Table 4)
    "rlora-init-only": (RLoRALinear, {"multi_head_dropout": False}),  # "+Init"
    "mlora": (MLoRALinear, {}),
    "mlora-mean": (MLoRALinear, {"head_reduction": "mean"}),
    "mtl": (MTLLoRALinear, {"num_tasks": T}),
    "mtl-diagonal": (MTLLoRALinear, {"num_tasks": T, "diagonal": True}),
    "multilora": (MultiLoRALinear, {}),
    "multilora-scalar": (MultiLoRALinear, {"scale_granularity": "scalar"}),
}
HEADS = (HydraLoRALinear, HydraNoRouterLinear, RLoRALinear, MLoRALinear)  # shared A, N heads B_i (§2.3–2.6)
MULTI = (*HEADS, MTLLoRALinear, MultiLoRALinear)
MERGEABLE = ["lora", "lora-rslora", "hydra-norouter", "hydra-norouter-mean", "mlora", "mlora-mean", "multilora",
             "multilora-scalar"]


def make(case, dropout=0.0, seed=0):
    cls, kw = CASES[case]
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT)
    if cls in MULTI:
        kw = {"heads": N, **kw}
    m = cls(base, rank=R, alpha=6, dropout=dropout, **kw)
    m.adapter_name = "m"
    return m


def randomize(module, seed=1, std=0.5):
    """Replace every trainable tensor by random values (inits like B = 0 would hide terms of the equation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def masks(shape, p, seed):
    """The inverted-dropout mask F.dropout draws for a tensor of `shape` right after manual_seed(seed)."""
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape), p, training=True)


def reference(m, x, mask, task_ids=None):
    """h = W0 x + b + ΔW(x) from METHODS §2.1–2.8 with explicit dense matrices, one head at a time, in float64.

    `mask` is the dropout mask: on x ([..., in]) for shared-mask adapters, on A x ([..., N, r]) for R-LoRA/M-LoRA.
    Returns (h, A-output).
    """
    d = lambda t: t.detach().double()
    x, mask = x.double(), mask.double()
    W0, b, s = d(m.weight), d(m.bias), m.scaling
    h = x @ W0.T + b
    if isinstance(m, LoRALinear):                                  # §2.1
        z = (x * mask) @ d(m.lora_A.weight).T
        return h + s * (x * mask) @ (d(m.lora_B.weight) @ d(m.lora_A.weight)).T, z
    if isinstance(m, HEADS):                                        # §2.3–2.6
        A, B = d(m.lora_A.weight), d(m.lora_B.weight)
        if getattr(m, "lora_router", None) is not None:
            w = torch.softmax(x @ d(m.lora_router.weight).T, -1)
        else:
            w = torch.full((*x.shape[:-1], N), 1.0 if m.head_reduction == "sum" else 1.0 / N, dtype=x.dtype)
        if getattr(m, "multi_head_dropout", False):                 # R-LoRA: per-head dropout after A
            z = x @ A.T
            for i in range(N):
                h = h + s * w[..., i:i + 1] * ((z * mask[..., i, :]) @ B[i].T)
        else:                                                       # HydraLoRA: one mask on x
            z = (x * mask) @ A.T
            for i in range(N):
                h = h + s * w[..., i:i + 1] * ((x * mask) @ (B[i] @ A).T)
        if isinstance(m, (RLoRALinear, MLoRALinear)):               # frozen compensation C
            h = h - x @ (d(m.comp_B) @ d(m.comp_A)).T
        return h, z
    if isinstance(m, MTLLoRALinear):                                # §2.7, sample by sample
        A, B = d(m.lora_A.weight), d(m.lora_B.weight)
        out = h.clone()
        for n, t in enumerate(task_ids.tolist()):
            lam = d(m.lora_lambda.weight[t])
            lam = torch.diag(lam) if lam.dim() == 1 else lam
            p = torch.softmax(d(m.lora_mix.weight[t]) / m.temperature, -1)
            Bt = sum(p[j] * B[j] for j in range(B.shape[0]))
            out[n] = h[n] + s * (x[n] * mask[n]) @ (Bt @ lam @ A).T
        return out, (x * mask) @ A.T
    if isinstance(m, MultiLoRALinear):                              # §2.8
        A, B, g = d(m.lora_A.weight), d(m.lora_B.weight), d(m.lora_scale.weight)
        for i in range(N):
            G = torch.diag(g[i]) if g.dim() == 2 else g[i] * torch.eye(OUT, dtype=x.dtype)
            h = h + s * (x * mask) @ (G @ B[i] @ A[i]).T
        return h, torch.cat([(x * mask) @ A[i].T for i in range(N)], -1)
    raise AssertionError(type(m))


def run(m, x, task_ids, seed):
    with adapter_context(m, task_ids=task_ids, collect=True) as ctx:
        torch.manual_seed(seed)
        y = m(x)
    return y, ctx.a_outputs["m"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_reference_equation(case, train):
    """Output and reported A-output equal the METHODS equation evaluated head by head (the naive loop) with dense
    matrices, on random weights; in train mode with dropout 0.3 the masks are reproduced from the same seed."""
    p = 0.3
    m = randomize(make(case, dropout=p)).train(train)
    x = torch.randn(2, 5, IN)
    task_ids = torch.tensor([2, 0])
    y, z = run(m, x, task_ids, seed=7)
    per_head = getattr(m, "multi_head_dropout", False)
    shape = (2, 5, N, R) if per_head else x.shape
    mask = masks(shape, p, 7) if train else torch.ones(shape)
    ref, ref_z = reference(m, x, mask, task_ids)
    dy, dz = (y.double() - ref).abs().max().item(), (z.double() - ref_z).abs().max().item()
    print(f"{case:20s} {'train' if train else 'eval ':5s} max|h - ref| = {dy:.2e}  max|z - ref| = {dz:.2e}")
    assert dy < 1e-5 and dz < 1e-5
    assert (y - F.linear(x, m.weight, m.bias)).abs().max() > 1e-2  # the adapter term is really there


def test_dropout_masks_shared_or_per_head():
    """HydraLoRA uses one mask on x for all heads; R-LoRA draws an independent mask per head on A x (METHODS §2.5)."""
    m = randomize(make("rlora", dropout=0.5)).train()
    x = torch.randn(4, 6, IN)
    mask = masks((4, 6, N, R), 0.5, 3)
    assert not torch.equal(mask[..., 0, :], mask[..., 1, :])  # the reference masks differ per head ...
    y, _ = run(m, x, None, seed=3)
    ref, _ = reference(m, x, mask)
    assert (y.double() - ref).abs().max() < 1e-5                # ... and the module used exactly those
    shared, _ = reference(m, x, mask[..., :1, :].expand_as(mask))
    assert (y.double() - shared).abs().max() > 1e-3             # a single shared mask would give another output


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    """Dropout acts only in training (inverted dropout, METHODS §1)."""
    for case in ("lora", "hydra", "rlora", "mtl", "multilora"):
        m = randomize(make(case, dropout=0.5))
        x, t = torch.randn(2, 5, IN), torch.tensor([0, 1])
        m.eval()
        assert torch.equal(run(m, x, t, 1)[0], run(m, x, t, 2)[0])
        m.train()
        assert not torch.equal(run(m, x, t, 1)[0], run(m, x, t, 2)[0])


def test_each_adapter_is_a_sibling_with_its_own_forward():
    """Every adapter class subclasses AdapterLinear directly and defines its own forward (its equation) and lowrank:
    none inherits another adapter's; the shared base has no forward of its own to fall back on."""
    classes = list(dict.fromkeys(cls for cls, _ in KINDS.values()))
    assert len(classes) == 7 and "forward" not in vars(AdapterLinear)
    for cls in classes:
        assert cls.__bases__ == (AdapterLinear,), cls
        assert "forward" in vars(cls) and "lowrank" in vars(cls), cls


# ----------------------------------------------------------------------------- inits

@pytest.mark.parametrize("case", ["lora", "hydra", "hydra-norouter", "rlora-mt-only", "mtl", "mtl-diagonal",
                                  "multilora", "multilora-scalar"])
def test_zero_init_leaves_layer_unchanged(case):
    """B = 0 (LoRA, HydraLoRA, MTL-LoRA) or g = 0 (MultiLoRA) means ΔW = 0 at step 0: output == base output."""
    m = make(case).eval()
    x = torch.randn(2, 5, IN)
    y, _ = run(m, x, torch.tensor([0, 2]), 0)
    assert torch.equal(y, F.linear(x, m.weight, m.bias))
    assert m.lora_A.weight.abs().min() > 0  # A is kaiming-uniform, not zero
    if case.startswith("multilora"):       # MultiLoRA's B_i are kaiming too; its zero is g
        assert m.lora_B.weight.abs().min() > 0 and m.lora_scale.weight.abs().max() == 0


@pytest.mark.parametrize("case", ["rlora", "rlora-code", "rlora-init-only", "mlora", "mlora-mean"])
def test_random_init_heads_differ_and_compensation(case):
    """R-LoRA/M-LoRA heads are independent random draws (pairwise cosine near 0); the frozen compensation is
    C = s·Σ_i c_i B_i⁰ A⁰ (c = 1/N for R-LoRA and M-LoRA-mean, 1 for M-LoRA-sum), so M-LoRA's initial output equals
    the base exactly and R-LoRA's equals it for a uniform router; the base weight itself is never edited."""
    m = make(case).eval()
    torch.manual_seed(0)
    ref_w = nn.Linear(IN, OUT).weight
    assert torch.equal(m.weight, ref_w)
    B = m.lora_B.weight.detach()
    cos = F.cosine_similarity(B.flatten(1)[:, None], B.flatten(1)[None], dim=-1)
    assert cos[~torch.eye(N, dtype=torch.bool)].abs().max() < 0.6 and B.abs().min() > 0
    c = 1.0 / N if case != "mlora" else 1.0
    C = m.scaling * sum(c * B[i] for i in range(N)) @ m.lora_A.weight
    assert torch.allclose(m.comp_B @ m.comp_A, C, atol=1e-6)
    x = torch.randn(2, 5, IN)
    base = F.linear(x, m.weight, m.bias)
    if case in ("rlora", "rlora-init-only"):
        assert (m(x) - base).abs().max() > 1e-4  # a kaiming router is not uniform: cancellation is approximate
    if getattr(m, "lora_router", None) is not None:
        with torch.no_grad():
            m.lora_router.weight.zero_()         # uniform router: ω_i = 1/N
    assert (m(x) - base).abs().max() < 1e-5


def test_rlora_without_its_ingredients_is_hydra():
    """R-LoRA with multi_head_dropout=False and random_init=False is HydraLoRA (at R-LoRA's α/√r): from the same seed
    the same parameters bit for bit, and in train mode with dropout the same outputs and gradients (to fp32 round-off:
    R-LoRA's matmul also carries its compensation, here 0). So the ablation of tutorial 08 changes one ingredient at
    a time and nothing else."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    torch.manual_seed(5)
    hydra = HydraLoRALinear(base, rank=R, alpha=6, dropout=0.3, heads=N, rank_stabilized=True)
    torch.manual_seed(5)
    neither = RLoRALinear(base, rank=R, alpha=6, dropout=0.3, heads=N, multi_head_dropout=False, random_init=False)
    assert all(torch.equal(a, b) for a, b in zip(hydra.parameters(), neither.parameters()))
    assert neither.comp_B.abs().max() == 0 and neither.scaling == hydra.scaling
    randomize(hydra), randomize(neither)
    x = torch.randn(2, 5, IN)
    for m in (hydra, neither):
        m.adapter_name = "m"
        m.train()
    (y1, _), (y2, _) = run(hydra, x, None, seed=3), run(neither, x, None, seed=3)
    assert torch.allclose(y1, y2, rtol=1e-6, atol=1e-6)
    y1.square().sum().backward(), y2.square().sum().backward()
    for a, b in zip(hydra.parameters(), neither.parameters()):
        if a.requires_grad:
            assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max()


@pytest.mark.parametrize("case, differ", [("hydra", False), ("rlora-init-only", False), ("rlora-mt-only", True),
                                           ("rlora", True)])
def test_head_gradients_at_a_uniform_router_differ_only_with_per_head_dropout(case, differ):
    """Tutorial 08's mechanism: with a uniform router (ω_i = 1/N) head i's gradient is s/N·Σ_tokens δ zᵀ, the same for
    every head whatever the heads' values, so HydraLoRA and R-LoRA's random init alone ("+Init") give identical head
    gradients (random init separates where the heads start, not how they move), while per-head dropout ("+MT", and
    R-LoRA) gives each head its own masked z and its own gradient. (A kaiming router also separates them, by ω_i(x).)"""
    m = make(case, dropout=0.3).train()
    with torch.no_grad():
        m.lora_router.weight.zero_()
    torch.manual_seed(3)
    m(torch.randn(4, 6, IN)).square().sum().backward()
    g = m.lora_B.weight.grad
    spread = ((g - g[:1]).abs().max() / g.abs().max()).item()
    assert (spread > 1e-2) if differ else (spread <= 1e-6), spread


def test_rlora_init_scales():
    """Unit init × stable rescaling (METHODS §2.5): paper std(A) = f/√in, std(B_i) = f/√out with f = out^¼/√γ;
    code_faithful: f = r^¼/√γ applied N times to A and N−i times to head i; R-LoRA's scale is α/√r."""
    torch.manual_seed(0)
    base = nn.Linear(512, 1024)
    m = RLoRALinear(base, rank=8, alpha=16, heads=3)
    f = 1024 ** 0.25 / 8
    assert math.isclose(m.scaling, 16 / math.sqrt(8))
    assert math.isclose(m.lora_A.weight.std().item(), f / math.sqrt(512), rel_tol=0.05)
    for i in range(3):
        assert math.isclose(m.lora_B.weight[i].std().item(), f / math.sqrt(1024), rel_tol=0.05)
    m = RLoRALinear(base, rank=8, alpha=16, heads=3, code_faithful=True)
    f = 8 ** 0.25 / 8
    assert math.isclose(m.lora_A.weight.std().item(), f ** 3 / math.sqrt(512), rel_tol=0.05)
    for i in range(3):
        assert math.isclose(m.lora_B.weight[i].std().item(), f ** (3 - i) / math.sqrt(1024), rel_tol=0.05)


def test_mtl_single_task_equals_lora():
    """MTL-LoRA with T = 1, Λ = I and one B reduces to LoRA (METHODS §2.7 sanity test), on random A and B."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    lora = randomize(LoRALinear(base, rank=R, alpha=6))
    mtl = MTLLoRALinear(base, rank=R, alpha=6, heads=1, num_tasks=1)
    with torch.no_grad():
        mtl.lora_A.weight.copy_(lora.lora_A.weight)
        mtl.lora_B.weight.copy_(lora.lora_B.weight[None])
    x = torch.randn(3, 5, IN)
    with adapter_context(mtl, task_ids=torch.zeros(3, dtype=torch.long)):
        y = mtl(x)
    assert (y - lora(x)).abs().max() < 1e-6


# ----------------------------------------------------------------------------- tiny model

CFG = ModelConfig(arch="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False)
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return CausalLM(cfg).eval()


def batch(b=4, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (b, t), generator=g), torch.arange(b) % 2


def logits(model, ids, task_ids):
    with torch.no_grad(), adapter_context(model, task_ids=task_ids):
        return model(ids)


def test_apply_adapter_targets_and_freezing():
    """Every targeted nn.Linear (never lm_head) is replaced in place with the base weight kept under its old key;
    only adapter tensors train; the config is recorded."""
    model = tiny()
    keys = set(model.state_dict())
    apply_adapter(model, "lora", rank=4, targets=MLP)
    mods = adapter_modules(model)
    assert [n for n, _ in mods] == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in MLP]
    assert keys <= set(model.state_dict())  # the base keys are unchanged, so base checkpoints still load
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, AdapterLinear)
    assert model.adapter_config["kind"] == "lora" and model.adapter_config["modules"]["model.layers.0.mlp.up_proj"] == [48, 32]
    assert count_trainable(model) == 2 * 4 * ((32 + 48) * 2 + (48 + 32))


@pytest.mark.parametrize("call, msg", [
    (lambda m: apply_adapter_checked(m, "dora"), "unknown adapter kind"),
    (lambda m: apply_adapter_checked(m, "lora", gamma=3), "no option 'gamma'"),
    (lambda m: apply_adapter_checked(m, "hydra", router=False), "no option 'router'"),
    (lambda m: apply_adapter_checked(m, "lora", targets=("lm_head",)), "lm_head is never adapted"),
    (lambda m: apply_adapter_checked(m, "lora", targets=("fc1",)), "no nn.Linear named"),
    (lambda m: apply_adapter_checked(m, "mtl"), "num_tasks"),
    (lambda m: apply_adapter_checked(apply_adapter_checked(m, "lora"), "lora"), "already has"),
    (lambda m: apply_adapter_checked(m, "mlora", head_reduction="max"), "head_reduction"),
])
def test_apply_adapter_errors(call, msg):
    """Bad arguments give a one-line ValueError saying what is wrong (through the plumbing's checked form, which
    checks kind and options before the book's apply_adapter)."""
    with pytest.raises(ValueError, match=msg):
        call(tiny())


def test_context_reports_a_outputs_and_is_removed():
    """adapter_context hands every adapter one context; A-outputs [B, T, r] (MultiLoRA n·r) carry grad; a no-grad
    re-run never replaces them; on exit the context is gone; MTL-LoRA without task ids is a clear error."""
    ids, tids = batch()
    for kind, width in (("align", 4), ("rlora", 4), ("multilora", 12)):
        model = apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP)
        with adapter_context(model, collect=True) as ctx:
            model(ids)
            first = dict(ctx.a_outputs)
            with torch.no_grad():
                model(ids)
        assert list(first) == [n for n, _ in adapter_modules(model)]
        assert all(z.shape == (4, 7, width) and z.requires_grad for z in first.values())
        assert all(ctx.a_outputs[k] is first[k] for k in first)
        assert all(m.adapter_ctx is None for _, m in adapter_modules(model))
    model = apply_adapter(tiny(), "mtl", rank=4, targets=MLP, num_tasks=2)
    with pytest.raises(ValueError, match="task ids"):
        model(ids)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        with adapter_context(model, task_ids=torch.tensor([0, 1, 2, 0])):
            pass


@pytest.mark.parametrize("kind", ["align", "rlora", "mtl"])
def test_gradient_checkpointing_gives_same_alignment_gradients(kind):
    """An alignment-style loss on ctx.a_outputs plus the LM loss gives the same gradients with per-block
    (non-reentrant) checkpointing on and off, with dropout active (checkpoint replays the RNG); backward runs
    inside the context so MTL-LoRA's recomputation still sees its task ids."""
    ids, tids = batch()
    grads = []
    for ckpt in (False, True):
        model = apply_adapter(tiny(), kind, rank=4, heads=3, dropout=0.2, targets=MLP, num_tasks=2).train()
        model.gradient_checkpointing = ckpt
        torch.manual_seed(5)
        with adapter_context(model, task_ids=tids, collect=True) as ctx:
            out = model(ids)
            la = sum((z[tids == 0].mean((0, 1)) - z[tids == 1].mean((0, 1))).pow(2).sum()
                     for z in ctx.a_outputs.values())
            (out.logsumexp(-1).mean() + la).backward()
            assert len(ctx.a_outputs) == 6
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "lora_A" in n)  # the alignment term reaches A
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_mtl_checkpoint_recompute_outside_context_is_a_clear_error():
    """With checkpointing, backward re-runs the forward; outside adapter_context MTL-LoRA has no task ids then and
    says so (instead of silently using stale ones)."""
    ids, tids = batch()
    model = apply_adapter(tiny(), "mtl", rank=4, targets=MLP, num_tasks=2).train()
    model.gradient_checkpointing = True
    with adapter_context(model, task_ids=tids):
        out = model(ids)
    with pytest.raises(ValueError, match="the backward"):
        out.sum().backward()


def test_hydra_without_router_keeps_identical_heads():
    """HydraLoRA w/o router (METHODS §2.4): every head gets the same gradient, so after AdamW steps the heads are
    still identical (cosine 1); with the router they diverge."""
    ids, _ = batch()
    sims = {}
    for kind in ("hydra-norouter", "hydra"):
        model = apply_adapter(tiny(), kind, rank=4, heads=3, dropout=0.1, targets=MLP).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(4):
            out = model(ids[:, :-1])
            F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        sims[kind] = head_cosine_similarity(model)
        if kind == "hydra-norouter":
            for _, m in adapter_modules(model):
                B = m.lora_B.weight
                assert B.abs().max() > 0 and (B - B[:1]).abs().max() < 1e-6
    assert all(abs(v - 1) < 1e-6 for v in sims["hydra-norouter"].values())
    assert max(sims["hydra"].values()) < 0.999


# ----------------------------------------------------------------------------- merge

@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_equals_unmerged(case):
    """A merged nn.Linear (W0 + ΔW) reproduces the eval-mode adapter output to fp32 round-off."""
    m = randomize(make(case, dropout=0.3)).eval()
    x = torch.randn(2, 5, IN)
    merged = m.merge()
    assert type(merged) is nn.Linear
    d = (merged(x) - m(x)).abs().max().item()
    print(f"merge {case:20s} max|merged - unmerged| = {d:.2e}")
    assert d < 1e-5


@pytest.mark.parametrize("kind", ["lora", "align", "hydra-norouter", "mlora", "multilora"])
def test_merge_adapters_model(kind):
    """merge_adapters turns a model with random adapters back into plain nn.Linear layers with the same logits, up
    to float32 rounding (the merge is computed in fp32 by design): 1e-4 on logits of order 1, far below what a wrong
    term of ΔW moves them by (with these random adapters, std 0.2, halving the B of one module shifts the logits by
    0.09 to 2.2 depending on the kind), and above the rounding, whose last bits depend on the CPU's kernels (an
    earlier 1e-5 held on an AMD box and missed by 1.4e-5 on an Intel one, for HydraLoRA's summed heads)."""
    ids, tids = batch()
    model = randomize(apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP + ("q_proj", "v_proj")), std=0.2)
    before = logits(model, ids, tids)
    merge_adapters(model)
    assert not adapter_modules(model) and not hasattr(model, "adapter_config")
    assert (model(ids) - before).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["hydra", "rlora", "mtl"])
def test_unmergeable_adapters_refuse(kind):
    """Routers (HydraLoRA, R-LoRA) and per-task adapters (MTL-LoRA) cannot be merged (METHODS §7 claim 7)."""
    model = apply_adapter(tiny(), kind, rank=4, targets=MLP, num_tasks=2)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(model)
    assert len(adapter_modules(model)) == 6  # nothing was half-merged


# ----------------------------------------------------------------------------- parameter counts (METHODS §1)

QWEN3B = dict(arch="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
              num_attention_heads=16, num_key_value_heads=2, head_dim=128, qkv_bias=True, tie_word_embeddings=True)
QWEN7B = dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, head_dim=128, qkv_bias=True, tie_word_embeddings=False)
LLAMA7B = dict(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False)
QV = ("q_proj", "v_proj")


def meta_model(cfg):
    with torch.device("meta"):
        return CausalLM(ModelConfig(**cfg))


@pytest.mark.parametrize("cfg, base, kind, rank, heads, targets, trainable, pct", [
    (QWEN7B, 7_615_616_512, "lora", 8, 1, MLP, 15_138_816, "0.199"),
    (QWEN7B, 7_615_616_512, "lora", 10, 1, MLP, 18_923_520, "0.248"),
    (QWEN3B, 3_085_938_688, "mlora", 4, 3, MLP, 12_570_624, "0.407"),
    (QWEN3B, 3_085_938_688, "hydra", 4, 3, MLP, 14_201_856, "0.460"),
    (QWEN3B, 3_085_938_688, "rlora", 4, 3, MLP, 14_201_856, "0.460"),
    (LLAMA7B, 6_738_415_616, "lora", 8, 1, QV, 4_194_304, "0.0622"),
    (LLAMA7B, 6_738_415_616, "mlora", 8, 10, QV, 23_068_672, "0.342"),
])
def test_parameter_counts_match_methods_table(cfg, base, kind, rank, heads, targets, trainable, pct):
    """Trainable counts and %Param of METHODS §1's table, on meta-device CausalLMs with the real HF configs."""
    model = meta_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == base
    apply_adapter(model, kind, rank=rank, heads=heads, targets=targets)
    assert count_trainable(model) == trainable
    assert f"{100 * trainable / base:.{len(pct.split('.')[1])}f}" == pct


def test_hydra_router_not_counted_equals_mlora_count():
    """LLaMA2-7B, r=8, 10 heads on q/v, router not counted = 23,068,672 (R-LoRA Table 3's 0.341%)."""
    model = apply_adapter(meta_model(LLAMA7B), "hydra", rank=8, heads=10, targets=QV)
    routers = sum(m.lora_router.weight.numel() for _, m in adapter_modules(model))
    assert count_trainable(model) - routers == 23_068_672


def test_rank_for_budget():
    """The LoRA rank matching a budget (§2.2): Qwen2.5-7B MLP 15.1M -> 8, 18.9M -> 10; LLaMA2-7B q/v with the
    HydraLoRA r=8 ×10 heads budget -> 44 (METHODS's '≈44'); a ModelConfig or HF dict works as well as a model."""
    q7 = meta_model(QWEN7B)
    assert rank_for_budget(q7, MLP, 15_138_816) == 8
    assert rank_for_budget(q7, MLP, 18_923_520) == 10
    assert rank_for_budget(q7, MLP, 17_000_000) == 9
    assert rank_for_budget(ModelConfig(**LLAMA7B), QV, 23_068_672) == 44
    hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
          "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2}
    assert rank_for_budget(hf, MLP, 12_570_624) == 9  # M-LoRA's 0.41% budget on Qwen2.5-3B = LoRA rank 8.9


@pytest.mark.parametrize("kind", ["lora", "hydra", "rlora", "mlora", "mtl", "multilora"])
def test_bf16_base_with_fp32_adapters(kind):
    """Adapter tensors are created in fp32 (STYLE.md) and work on a bf16 base, with and without autocast: the
    logits stay close to the all-fp32 model's and have the base's dtype."""
    ids, tids = batch()
    model = randomize(apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP, num_tasks=2), std=0.05)
    ref = logits(model, ids, tids)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model, ids, tids)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    half = logits(model, ids, tids)
    assert half.dtype == torch.bfloat16
    tol = 0.05 * ref.abs().max()  # bf16 keeps ~3 significant digits; a dtype bug would be far off
    assert (auto.float() - ref).abs().max() < tol and (half.float() - ref).abs().max() < tol


def old_router(x, w):
    """HydraLoRA's router before RouterLogits: fp32 logits of an fp32 copy of x (which autograd keeps)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), w.float()).softmax(-1).to(x.dtype)


def test_router_equals_old_computation_and_keeps_no_fp32_copy():
    """The router weights ω(x) and their gradients (w.r.t. x and W_r) equal the old F.linear(x.float(), W_r)
    computation exactly for fp32 x and to bf16 round-off for bf16 x; and for a bf16 x nothing of x's size is
    saved for the backward in fp32 (the old code kept such a copy for every routed layer)."""
    m = randomize(make("hydra"))
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, IN, generator=g).to(dtype)
        dy = torch.randn(5, 7, N, generator=g).to(dtype)
        out = []
        for fn in (old_router, None):
            xi = x.clone().requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = old_router(xi, m.lora_router.weight) if fn else route(xi, m.lora_router.weight)
            (y.float() * dy.float()).sum().backward()
            out.append((y, xi.grad, m.lora_router.weight.grad.clone(), saved))
            m.lora_router.weight.grad = None
        (y0, gx0, gw0, saved_old), (y1, gx1, gw1, saved_new) = out
        tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
        for a, b in ((y1, y0), (gx1, gx0), (gw1, gw0)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)
        big_fp32 = lambda ts: [t for t in ts if t.dtype == torch.float32 and t.numel() == x.numel()]
        if dtype == torch.bfloat16:
            assert big_fp32(saved_old) and not big_fp32(saved_new)


@pytest.mark.parametrize("cls", [HydraNoRouterLinear, MLoRALinear])
@pytest.mark.parametrize("heads", [2, 3])
def test_summed_heads_step_n_squared_as_far_as_averaged(cls, heads):
    """Heads summed (c_i = 1) vs averaged (c_i = 1/N), same init: each head's gradient carries c and the N heads add
    with c again, so one SGD step from ΔW = 0 moves ΔW N² times as far (tutorial 04's mechanism; claim 1's
    step-size control)."""
    def moved(reduction):
        torch.manual_seed(0)
        m = cls(nn.Linear(32, 32), rank=4, alpha=16, heads=heads, head_reduction=reduction)
        delta_w = lambda: m.delta_weight().detach()
        before = delta_w()
        assert before.abs().max() < 1e-6  # zero heads (HydraLoRA), or the compensation C (M-LoRA)
        m(torch.randn(64, 32)).pow(2).mean().backward()
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 1e-2 * p.grad
        return (delta_w() - before).norm().item()
    assert moved("sum") / moved("mean") == pytest.approx(heads ** 2, rel=1e-2)
