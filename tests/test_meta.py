"""MeTA-LoRA (nanoalign/meta.py, METHODS §2.9) against hand-written references on the tiny random Llama of
conftest.py, in float64: k = 0 is a plain multi-task LoRA gradient, first order is the gradient at the SGD-adapted
copy θ − α∇L_S computed on a deep-copied model, second order matches central finite differences of the meta
objective; the shared adapter is never written; the episode sampler is deterministic, resumable and disjoint."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import nanoalign
import nanoalign.plumbing
from nanoalign.adapters import apply_adapter
from nanoalign.data import IGNORE_INDEX, encode_tasks
from nanoalign.meta import MetaConfig, MetaSampler, answer_loss, limit_shots, meta_step
from nanoalign.model import RMSNorm
from nanoalign.plumbing.tasks import builtin_examples
from conftest import JSONL_TASKS

ALPHA = 0.5  # large enough that the adaptation visibly changes the gradient on the tiny model


@pytest.fixture(scope="module", autouse=True)
def float64_norm():
    """RMSNorm computes in fp32 (model.py: `x.float()`), which rounds a float64 model to fp32 precision and drowns
    the finite differences; for these tests it computes in at least fp32 (float64 stays float64)."""
    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RMSNorm, "forward", forward)
        yield


@pytest.fixture(scope="module")
def pools(tiny, one_thread):
    tok = nanoalign.plumbing.load_tokenizer(str(tiny))
    tasks = {t: builtin_examples(t, "train", n=12) for t in JSONL_TASKS}
    return encode_tasks(tok, tasks, 64), tok.pad_id


def lora64(tiny, seed=0):
    """The tiny Llama with a LoRA on the MLP and q/v, in float64, B random so that ΔW ≠ 0 (every term matters)."""
    model = nanoalign.plumbing.load_model(str(tiny))
    torch.manual_seed(seed)
    apply_adapter(model, "lora", rank=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    model.double().train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def ref_loss(model, batch):
    """Answer-only CE the plain way: full logits, labels shifted by one, ignore_index (no functional_call)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def ref_adapted(model, support, k, alpha):
    """A deep copy of `model` after k plain SGD steps of lr alpha on the support batch (ordinary backward, in-place
    update of the copy): the θ_i of METHODS §2.9 computed without meta.py."""
    m = copy.deepcopy(model)
    for _ in range(k):
        for p in trainable(m):
            p.grad = None
        ref_loss(m, support).backward()
        with torch.no_grad():
            for p in trainable(m):
                p -= alpha * p.grad
    for p in trainable(m):
        p.grad = None
    return m


def meta_grads(model, episode, cfg, **kw):
    for p in trainable(model):
        p.grad = None
    stats = meta_step(model, episode, cfg, **kw)
    return [p.grad.clone() for p in trainable(model)], stats


def episode(pools, n=3, seed=0, **kw):
    data, pad = pools
    return next(MetaSampler(data, MetaConfig(tasks=n, support=2, query=2, **kw), seed=seed, pad_id=pad))


def close(a, b, rel=1e-10):
    scale = max(max(x.abs().max().item() for x in b), 1e-30)
    return max((x - y).abs().max().item() for x, y in zip(a, b)) <= rel * scale


def test_answer_loss_is_the_plain_answer_cross_entropy(tiny, pools):
    """answer_loss (logits only at answer positions, through functional_call with the model's own tensors) equals
    the full-logit shifted cross-entropy with ignore_index, and changes when the params dict changes."""
    model = lora64(tiny)
    b = episode(pools)["tasks"][0]["query"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        assert abs(answer_loss(model, params, b).item() - ref_loss(model, b).item()) < 1e-12
        moved = {n: p + 0.1 for n, p in params.items()}
        assert abs(answer_loss(model, moved, b).item() - ref_loss(model, b).item()) > 1e-4


def test_zero_inner_steps_is_plain_multitask_lora(tiny, pools):
    """k = 0: the meta gradient equals the gradient of mean_i L_{Q_i} by ordinary backward on the model (a plain
    multi-task LoRA step on the query batches, each task weighing the same); sum is n times the mean."""
    model, ep = lora64(tiny), episode(pools)
    got, stats = meta_grads(model, ep, MetaConfig(inner_steps=0))
    for p in trainable(model):
        p.grad = None
    losses = [ref_loss(model, t["query"]) for t in ep["tasks"]]
    (sum(losses) / len(losses)).backward()
    want = [p.grad.clone() for p in trainable(model)]
    assert close(got, want)
    assert abs(stats["loss"] - sum(x.item() for x in losses) / len(losses)) < 1e-12 and stats["support_loss"] is None
    lengths = torch.cat([t["query"]["attention_mask"].sum(1) for t in ep["tasks"]])
    assert (stats["tokens"], stats["tokens_sq"]) == (lengths.sum().item(), (lengths ** 2).sum().item())
    summed, _ = meta_grads(model, ep, MetaConfig(inner_steps=0, agg="sum"))
    assert close(summed, [3 * w for w in want])


@pytest.mark.parametrize("k", [1, 2])
def test_first_order_is_the_gradient_at_the_adapted_copy(tiny, pools, k):
    """First order: the meta gradient equals mean_i ∇L_{Q_i}(θ_i) with θ_i = θ after k SGD steps of α on S_i,
    computed on deep copies of the model with ordinary backward; it differs from the k = 0 gradient."""
    model, ep = lora64(tiny), episode(pools)
    got, stats = meta_grads(model, ep, MetaConfig(inner_steps=k, inner_lr=ALPHA))
    want = [torch.zeros_like(p) for p in trainable(model)]
    for t in ep["tasks"]:
        m = ref_adapted(model, t["support"], k, ALPHA)
        ref_loss(m, t["query"]).backward()
        for w, p in zip(want, trainable(m)):
            w += p.grad / len(ep["tasks"])
    assert close(got, want)
    plain, _ = meta_grads(model, ep, MetaConfig(inner_steps=0))
    assert not close(got, plain, rel=1e-3)
    assert stats["support_loss"] is not None
    real = lambda part: sum(int(t[part]["attention_mask"].sum()) for t in ep["tasks"])  # noqa: E731
    assert stats["tokens"] == k * real("support") + real("query")


def test_shared_adapter_is_never_written(tiny, pools):
    """Neither order writes the shared tensors (same values, same autograd version counter) although the inner
    loop really adapts: the params dict of the query forward differs from the shared tensors."""
    model, ep = lora64(tiny), episode(pools)
    before = [(p.detach().clone(), p._version) for p in trainable(model)]
    seen = []

    def spy(model, params, batch):
        seen.append({n: t.detach().clone() for n, t in params.items()})
        return answer_loss(model, params, batch)

    for order in (1, 2):
        seen.clear()
        meta_grads(model, ep, MetaConfig(inner_steps=2, inner_lr=ALPHA, order=order), loss_fn=spy)
        assert all(torch.equal(p, v) and p._version == ver for p, (v, ver) in zip(trainable(model), before))
        shared = dict(model.named_parameters())
        assert len(seen) == 3 * ep["num_tasks"]  # 2 support + 1 query forward per task
        assert all(torch.equal(seen[0][n], shared[n]) for n in seen[0])  # the first inner step starts at θ
        assert any(not torch.equal(seen[2][n], shared[n]) for n in seen[2])  # the query sees θ_i ≠ θ


def meta_objective(model, ep, k, alpha):
    """mean_i L_{Q_i}(θ_i) with θ_i from ref_adapted: the function whose gradient second order computes."""
    total = 0.0
    for t in ep["tasks"]:
        m = ref_adapted(model, t["support"], k, alpha)
        with torch.no_grad():
            total += ref_loss(m, t["query"]).item()
    return total / len(ep["tasks"])


@pytest.mark.parametrize("k", [1, 2])
def test_second_order_matches_finite_differences(tiny, pools, k):
    """Second order: <g, v> equals the central difference (f(θ + εv) − f(θ − εv)) / 2ε of the meta objective f
    (computed with deep copies and ordinary SGD) along random directions v; the first-order gradient does not.
    Measured: the difference shrinks as ε² (ε = 1e-3 ... 1e-6) down to ~1e-8 relative."""
    model, ep, alpha = lora64(tiny), episode(pools, n=2), 0.1
    g2, _ = meta_grads(model, ep, MetaConfig(inner_steps=k, inner_lr=alpha, order=2))
    g1, _ = meta_grads(model, ep, MetaConfig(inner_steps=k, inner_lr=alpha, order=1))
    gen, eps = torch.Generator().manual_seed(3), 1e-6
    for _ in range(2):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in trainable(model)]
        fd = []
        for sign in (1, -1):
            m = copy.deepcopy(model)
            with torch.no_grad():
                for p, d in zip(trainable(m), v):
                    p += sign * eps * d
            fd.append(meta_objective(m, ep, k, alpha))
        fd = (fd[0] - fd[1]) / (2 * eps)
        dot2 = sum((g * d).sum().item() for g, d in zip(g2, v))
        dot1 = sum((g * d).sum().item() for g, d in zip(g1, v))
        print(f"k={k}: finite difference {fd:.8f}, second order {dot2:.8f}, first order {dot1:.8f}")
        assert abs(dot2 - fd) < 1e-6 * max(1.0, abs(fd))
        assert abs(dot1 - fd) > 1e-2 * max(1.0, abs(fd))


def test_gradient_accumulates_and_scales(tiny, pools):
    """Like a backward, meta_step adds to an existing .grad; `scale` multiplies its contribution."""
    model, ep = lora64(tiny), episode(pools)
    cfg = MetaConfig(inner_steps=1, inner_lr=ALPHA)
    full, _ = meta_grads(model, ep, cfg)
    for p in trainable(model):
        p.grad = None
    meta_step(model, ep, cfg, scale=0.25)
    meta_step(model, ep, cfg, scale=0.75)
    assert close([p.grad for p in trainable(model)], full, rel=1e-12)


def test_meta_steps_with_adamw_lower_the_query_loss(tiny, pools):
    """A few outer AdamW steps on fresh episodes (fp32, as train.py) lower the post-adaptation query loss of a fixed
    held-out episode: the gradient points downhill."""
    model = nanoalign.plumbing.load_model(str(tiny))
    torch.manual_seed(0)
    apply_adapter(model, "lora", rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))
    model.train()
    data, pad = pools
    cfg = MetaConfig(tasks=3, support=2, query=2, inner_steps=1, inner_lr=0.05)
    sampler = MetaSampler(data, cfg, seed=1, pad_id=pad)
    held = next(MetaSampler(data, cfg, seed=99, pad_id=pad))
    opt = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.0)

    def held_loss():
        for p in trainable(model):
            p.grad = None
        return meta_step(model, held, cfg)["loss"]

    start = held_loss()
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        meta_step(model, next(sampler), cfg)
        opt.step()
    end = held_loss()
    print(f"held-out query loss {start:.3f} -> {end:.3f}")
    assert end < start - 0.1


# ----------------------------------------------------------------------------- sampler and shots

def test_sampler_is_deterministic_disjoint_and_resumes(pools):
    """Same seed, same episodes (indices and tensors); another seed, other episodes; support and query are
    disjoint; n distinct tasks per episode; a JSON round trip of state_dict resumes the exact stream."""
    data, pad = pools
    cfg = MetaConfig(tasks=2, support=3, query=4)
    a, b = MetaSampler(data, cfg, seed=5, pad_id=pad), MetaSampler(data, cfg, seed=5, pad_id=pad)
    other = MetaSampler(data, cfg, seed=6, pad_id=pad)
    plans = []
    for _ in range(20):
        x, y = next(a), next(b)
        plans.append([(t["task_id"], t["support_idx"], t["query_idx"]) for t in x["tasks"]])
        assert plans[-1] == [(t["task_id"], t["support_idx"], t["query_idx"]) for t in y["tasks"]]
        for t, r in zip(x["tasks"], y["tasks"]):
            for part in ("support", "query"):
                assert all(torch.equal(t[part][k], r[part][k]) for k in t[part])
        assert x["num_tasks"] == 2 and len({t["task_id"] for t in x["tasks"]}) == 2
        for t in x["tasks"]:
            assert len(t["support_idx"]) == 3 and len(t["query_idx"]) == 4
            assert not set(t["support_idx"]) & set(t["query_idx"])
            assert (t["support"]["task_ids"] == t["task_id"]).all() and t["support"]["input_ids"].shape[0] == 3
    assert plans != [[(t["task_id"], t["support_idx"], t["query_idx"]) for t in next(other)["tasks"]]
                     for _ in range(20)]
    assert len({tuple(t for t, _, _ in p) for p in plans}) > 1  # the tasks drawn vary over episodes
    resumed = MetaSampler(data, cfg, seed=5, pad_id=pad)
    resumed.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        assert [t["query_idx"] for t in next(resumed)["tasks"]] == [t["query_idx"] for t in next(a)["tasks"]]


def test_sampler_caps_tasks_splits_ranks_and_checks(pools):
    """n is capped at the number of tasks; under DDP the ranks split one episode's tasks between them; too few
    examples, too many ranks and a mismatched resume state are clear errors."""
    data, pad = pools
    full = next(MetaSampler(data, MetaConfig(tasks=10), seed=0, pad_id=pad))
    assert full["num_tasks"] == 3 and [t["task"] for t in full["tasks"]] == sorted(data)
    ranks = [next(MetaSampler(data, MetaConfig(tasks=3), seed=0, rank=r, world_size=2, pad_id=pad)) for r in (0, 1)]
    assert sorted(t["query_idx"] for r in ranks for t in r["tasks"]) == sorted(t["query_idx"] for t in full["tasks"])
    assert all(r["num_tasks"] == 3 for r in ranks)
    with pytest.raises(ValueError, match="needs --meta-support \\+ --meta-query = 13 examples"):
        MetaSampler(data, MetaConfig(support=6, query=7))
    with pytest.raises(ValueError, match="at least one task each"):
        MetaSampler(data, MetaConfig(tasks=2), world_size=3)
    s = MetaSampler(data, MetaConfig(tasks=2), seed=0)
    with pytest.raises(ValueError, match="meta sampler state has seed=1"):
        s.load_state_dict({**s.state_dict(), "seed": 1})


def test_limit_shots_is_seeded_nested_and_ordered():
    """K rows per task, in their original order, the same for the same seed, other rows for another seed, nested
    across K (the 4 shots are among the 8); a task with fewer rows keeps them all; 0 keeps everything."""
    rows = {"a": list(range(20)), "b": list(range(100, 105))}
    k8 = limit_shots(rows, 8, seed=1)
    assert len(k8["a"]) == 8 and k8["a"] == sorted(k8["a"]) and k8["b"] == rows["b"]
    assert k8 == limit_shots(rows, 8, seed=1) and k8["a"] != limit_shots(rows, 8, seed=2)["a"]
    assert set(limit_shots(rows, 4, seed=1)["a"]) < set(k8["a"])
    assert limit_shots(rows, 0) == rows
    with pytest.raises(ValueError, match="--shots must be a non-negative integer"):
        limit_shots(rows, -1)


def test_config_checks_and_refusals(tiny, pools):
    """Bad MeTA options name their flag; from_flags reads meta_* attributes; gradient checkpointing is refused
    (its recompute would run with θ, not θ_i)."""
    for bad, msg in [({"tasks": 0}, "--meta-tasks"), ({"inner_steps": -1}, "--meta-inner-steps"),
                     ({"inner_lr": float("nan")}, "--meta-inner-lr"), ({"agg": "max"}, "--meta-agg"),
                     ({"order": 3}, "--meta-order"), ({"query": 0}, "--meta-query")]:
        with pytest.raises(ValueError, match=msg):
            MetaConfig(**bad)

    class Flags:
        meta_tasks, meta_support, meta_query, meta_inner_steps, meta_inner_lr, meta_agg, meta_order = \
            2, 3, 5, 4, 0.1, "sum", 2
    assert MetaConfig.from_flags(Flags) == MetaConfig(2, 3, 5, 4, 0.1, "sum", 2)
    model = lora64(tiny)
    model.gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient checkpointing"):
        meta_step(model, episode(pools), MetaConfig())


def test_autocast_loss_is_close_to_fp32(tiny, pools):
    """answer_loss(autocast=True), the path train.py takes on CUDA, gives a meta gradient within bf16 precision of
    the fp32 one (checked on CPU, where bf16 autocast also works)."""
    import functools
    model = nanoalign.plumbing.load_model(str(tiny))
    torch.manual_seed(0)
    apply_adapter(model, "lora", rank=4, alpha=8, targets=("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ep, cfg = episode(pools), MetaConfig(inner_steps=1, inner_lr=0.05)
    ref, _ = meta_grads(model, ep, cfg)
    auto, stats = meta_grads(model, ep, cfg, loss_fn=functools.partial(answer_loss, autocast=True))
    norm = lambda gs: sum(g.pow(2).sum() for g in gs).sqrt().item()  # noqa: E731
    err = norm([a - r for a, r in zip(auto, ref)]) / norm(ref)
    print(f"bf16 autocast meta gradient: relative error {err:.1e}")
    assert err < 0.05 and all(a.dtype == torch.float32 for a in auto)


def test_answer_loss_is_sync_free_and_equals_the_bool_mask_call(tiny, pools):
    """answer_loss hands the model flat logit indices made on the host and right_padded=True (MetaSampler pads on
    the right), so on a GPU it never waits for the device; on the trainer's fast model its value and gradients
    equal those of the bool-mask call with padding read from the mask, bit for bit."""
    from torch.func import functional_call
    from nanoalign.data import answer_positions
    from nanoalign.plumbing import fast
    model = fast.install(lora64(tiny))
    batch = episode(pools)["tasks"][0]["query"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    calls = []
    real = model.forward
    model.forward = lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    loss = answer_loss(model, params, batch)
    model.forward = real
    assert calls and calls[0]["right_padded"] is True and calls[0]["logits_at"].dtype == torch.long
    at, targets = answer_positions(batch["labels"])
    logits = functional_call(model, params, (batch["input_ids"], batch["attention_mask"]), {"logits_at": at})
    ref = F.cross_entropy(logits, targets)
    g, g_ref = (torch.autograd.grad(x, list(params.values())) for x in (loss, ref))
    assert torch.equal(loss, ref) and all(torch.equal(a, b) for a, b in zip(g, g_ref))
