"""Align-LoRA's alignment losses against closed forms, torch.distributions and naive loops: the book's readable form
(nanoalign/align.py) and the fast form training uses (nanoalign/plumbing/fast.py), and the two against each other."""

import itertools

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from nanoalign import align
from nanoalign.align import (MMD_SIGMAS, alignment_loss, kl_alignment_loss, mmd_alignment_loss, task_groups)
from nanoalign.plumbing import fast

BOTH = pytest.mark.parametrize("loss_fn", [align.alignment_loss, fast.alignment_loss], ids=["book", "fast"])


def rand_groups(sizes, r=5, seed=0, dtype=torch.float64):
    """Groups with different means and scales per task, so every KL/MMD term is far from zero."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, r, generator=g, dtype=dtype) * (1 + i) + 0.7 * i) for i, n in enumerate(sizes)]


def ref_sym_kl(a, b, eps=0.0):
    """½[KL(p‖q)+KL(q‖p)] summed over dims, p, q = diagonal Normals fitted to rows (unbiased variance + eps)."""
    p = Normal(a.mean(0), (a.var(0) + eps).sqrt())
    q = Normal(b.mean(0), (b.var(0) + eps).sqrt())
    return 0.5 * (kl_divergence(p, q) + kl_divergence(q, p)).sum()


def naive_mmd(x, y, sigmas=MMD_SIGMAS):
    """Biased MMD² with k(u,v) = Σ_σ exp(−‖u−v‖²/(2σ)), by python loops over rows and bandwidths (float64)."""
    def k(u, v):
        d = float(((u.double() - v.double()) ** 2).sum())
        return sum(torch.exp(torch.tensor(-d / (2 * s), dtype=torch.float64)) for s in sigmas)

    def mean_k(a, b):
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


# ----------------------------------------------------------------------------- KL (A-LoRA-K)

@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.3])
def test_kl_matches_torch_distributions(eps):
    """Two tasks: the loss equals torch.distributions' Normal KL, symmetrised and summed over the rank dims."""
    a, b = rand_groups([40, 25])
    got = kl_alignment_loss([a, b], eps=eps)
    torch.testing.assert_close(got, ref_sym_kl(a, b, eps), rtol=1e-10, atol=1e-12)


def test_kl_fp32_inputs_match_reference():
    """fp32 and bf16 inputs are computed in fp32 and agree with the float64 reference (round-off only)."""
    a, b = rand_groups([64, 48], dtype=torch.float32)
    ref = ref_sym_kl(a.double(), b.double(), 1e-8)
    assert kl_alignment_loss([a, b]).dtype == torch.float32
    torch.testing.assert_close(kl_alignment_loss([a, b]).double(), ref, rtol=1e-5, atol=1e-6)
    a16, b16 = a.bfloat16(), b.bfloat16()
    got = kl_alignment_loss([a16, b16])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_sym_kl(a16.double(), b16.double(), 1e-8), rtol=1e-5, atol=1e-6)


def test_kl_symmetric_and_zero_for_identical_groups():
    """D(p,q) = D(q,p); D = 0 for the same rows (also reordered: only the moments matter); D > 0 otherwise."""
    a, b = rand_groups([30, 20])
    torch.testing.assert_close(kl_alignment_loss([a, b]), kl_alignment_loss([b, a]), rtol=1e-12, atol=0)
    assert kl_alignment_loss([a, a.clone()]).item() == 0.0
    assert abs(kl_alignment_loss([a, a.flip(0)]).item()) < 1e-12
    assert kl_alignment_loss([a, b]).item() > 0.1


def test_kl_pair_reductions_over_four_tasks():
    """With 4 tasks: mean (code) = average of the 6 pairwise terms, sum (paper) = their sum."""
    gs = rand_groups([12, 9, 20, 7])
    pairwise = [ref_sym_kl(gs[i], gs[j], 1e-8) for i, j in itertools.combinations(range(4), 2)]
    torch.testing.assert_close(kl_alignment_loss(gs), torch.stack(pairwise).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(kl_alignment_loss(gs, pair_reduction="sum"), torch.stack(pairwise).sum(),
                               rtol=1e-10, atol=0)


def test_kl_position_wise_matches_loop_over_positions():
    """[N, S, r] groups: per-position Normal KL (torch.distributions), summed over r, averaged over positions."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, 4, 3, generator=g, dtype=torch.float64) * 2 + 1
    c = torch.randn(7, 4, 3, generator=g, dtype=torch.float64) - 1
    gs = [a, b, c]
    ref = torch.stack([torch.stack([ref_sym_kl(gs[i][:, s], gs[j][:, s], 1e-8) for s in range(4)]).mean()
                       for i, j in itertools.combinations(range(3), 2)]).mean()
    torch.testing.assert_close(kl_alignment_loss(gs), ref, rtol=1e-10, atol=0)


def test_kl_position_wise_masked_matches_loop():
    """Masked position-wise statistics use only the unmasked rows at each position; positions with <2 rows in
    either task are skipped; the result equals a loop over positions on the kept rows."""
    g = torch.Generator().manual_seed(2)
    S = 5
    a = torch.randn(6, S, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, S, 3, generator=g, dtype=torch.float64) * 2 + 1
    ma = torch.rand(6, S, generator=g) > 0.3
    mb = torch.rand(5, S, generator=g) > 0.3
    ma[:, 0] = False                      # position 0: task a has no rows -> skipped
    mb[1:, 1], mb[0, 1] = False, True     # position 1: task b has one row -> skipped
    terms = [ref_sym_kl(a[ma[:, s], s], b[mb[:, s], s], 1e-8) for s in range(S)
             if ma[:, s].sum() >= 2 and mb[:, s].sum() >= 2]
    assert 1 <= len(terms) <= S - 2
    torch.testing.assert_close(kl_alignment_loss([(a, ma), (b, mb)]), torch.stack(terms).mean(), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- MMD (A-LoRA-M)

def test_mmd_zero_for_identical_sets_positive_for_shifted():
    """MMD² is 0 up to fp32 round-off for the same set of rows (as a separate tensor), and clearly > 0 when one
    set is shifted."""
    (a,) = rand_groups([50], r=8, dtype=torch.float32)
    assert abs(mmd_alignment_loss([a, a.clone()]).item()) < 1e-5
    assert abs(mmd_alignment_loss([a, a.flip(0)]).item()) < 1e-5
    assert mmd_alignment_loss([a, a + 0.5]).item() > 1e-2


@pytest.mark.parametrize("sigmas", [None, [0.5, 2.0]])
def test_mmd_matches_naive_loop(sigmas):
    """Three tasks: the vectorised MMD² equals python loops over rows and σ values, averaged over pairs."""
    gs = [x * 2 for x in rand_groups([6, 5, 4], r=3, dtype=torch.float32)]
    sig = MMD_SIGMAS if sigmas is None else sigmas
    ref = sum(naive_mmd(gs[i], gs[j], sig) for i, j in itertools.combinations(range(3), 2)) / 3
    torch.testing.assert_close(mmd_alignment_loss(gs, sigmas=sigmas).double(), ref, rtol=1e-5, atol=1e-6)
    ref_sum = ref * 3
    torch.testing.assert_close(mmd_alignment_loss(gs, sigmas=sigmas, pair_reduction="sum").double(), ref_sum,
                               rtol=1e-5, atol=1e-6)


def test_mmd_position_wise_masked_matches_naive_loop():
    """Position-wise MMD² with masks equals the naive MMD² on the unmasked rows at each position, averaged over
    positions where both tasks have at least one row."""
    g = torch.Generator().manual_seed(3)
    S = 4
    a, b = torch.randn(5, S, 3, generator=g), torch.randn(4, S, 3, generator=g) * 1.5 + 0.5
    ma, mb = torch.rand(5, S, generator=g) > 0.3, torch.rand(4, S, generator=g) > 0.3
    ma[:, 2] = False                      # no rows of a at position 2 -> skipped
    mb[0, 3] = True
    terms = [naive_mmd(a[ma[:, s], s], b[mb[:, s], s]) for s in range(S) if ma[:, s].any() and mb[:, s].any()]
    torch.testing.assert_close(mmd_alignment_loss([(a, ma), (b, mb)]).double(), sum(terms) / len(terms),
                               rtol=1e-5, atol=1e-6)
    # unmasked [N, S, r] groups: every row at every position counts
    full = sum(naive_mmd(a[:, s], b[:, s]) for s in range(S)) / S
    torch.testing.assert_close(mmd_alignment_loss([a, b]).double(), full, rtol=1e-5, atol=1e-6)


def test_mmd_max_rows_is_deterministic_even_subsampling():
    """max_rows keeps evenly spaced rows (same result on every call, no RNG); max_rows >= N changes nothing."""
    a, b = rand_groups([21, 11], r=3, dtype=torch.float32)
    idx = torch.linspace(0, 20, 6).round().long()
    want = mmd_alignment_loss([a[idx], b[torch.linspace(0, 10, 6).round().long()]])
    torch.testing.assert_close(mmd_alignment_loss([a, b], max_rows=6), want, rtol=0, atol=0)
    torch.testing.assert_close(mmd_alignment_loss([a, b], max_rows=100), mmd_alignment_loss([a, b]), rtol=0, atol=0)


def test_gradients_match_finite_differences():
    """gradcheck (float64) of both losses, token-level and masked position-wise: the checkpointed MMD kernel and
    the masked statistics give the analytic gradient."""
    g = torch.Generator().manual_seed(4)
    tok = [torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 4, 6)]
    pos = [torch.randn(n, 3, 2, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 5)]
    masks = [torch.rand(4, 3, generator=g) > 0.2, torch.rand(5, 3, generator=g) > 0.2]
    sig = [0.5, 3.0]
    assert torch.autograd.gradcheck(lambda *x: kl_alignment_loss(list(x)), tok)
    assert torch.autograd.gradcheck(lambda *x: mmd_alignment_loss(list(x), sigmas=sig), tok)
    assert torch.autograd.gradcheck(lambda *x: kl_alignment_loss(list(zip(x, masks))), pos)
    assert torch.autograd.gradcheck(lambda *x: mmd_alignment_loss(list(zip(x, masks)), sigmas=sig), pos)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("position_wise", [False, True])
def test_fast_gradients_match_finite_differences(kind, position_wise):
    """gradcheck (float64) of fast.alignment_loss: its weighted statistics and the GaussianKernels backward (which
    keeps k'(d) instead of the exponentials) give the analytic gradient, masked rows included."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 4, generator=g) > 0.25
    mask[:, 0] = True
    task = torch.tensor([0, 1, 2, 0, 1, 2])
    kw = dict(kind=kind, position_wise=position_wise, num_tasks=3)
    if kind == "mmd":
        kw.update(sigmas=[0.5, 3.0], max_rows=None)
    assert torch.autograd.gradcheck(lambda x: fast.alignment_loss({"m": x}, mask, task, **kw), (z,))


# ----------------------------------------------------------------------------- grouping and the module-level loss

def batch(B=6, T=7, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, r, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True                     # at least one token per example
    task = torch.tensor([0, 1, 2, 0, 1, 2])[:B]
    return z, mask, task


def test_task_groups_route_rows_by_task():
    """Token-level groups hold exactly the masked-in rows of each task's examples, in task-id order; position-wise
    groups hold the task's examples and their masks."""
    z, mask, task = batch()
    groups = task_groups(z, mask, task)
    assert len(groups) == 3
    for t, grp in enumerate(groups):
        want = torch.cat([z[b][mask[b]] for b in range(6) if task[b] == t])
        torch.testing.assert_close(grp, want, rtol=0, atol=0)
    pw = task_groups(z, mask, task, position_wise=True)
    for t, (x, m) in enumerate(pw):
        torch.testing.assert_close(x, z[task == t], rtol=0, atol=0)
        assert torch.equal(m, mask[task == t])
    # ids need not start at 0; num_tasks fixes the order and rejects ids out of range
    assert len(task_groups(z, mask, task + 5)) == 3
    with pytest.raises(ValueError, match="task_ids must lie in"):
        task_groups(z, mask, task, num_tasks=2)


@BOTH
def test_task_groups_skip_tasks_with_fewer_than_two_rows(loss_fn):
    """A task with 1 counted token (token-level) or 1 example (position-wise) is skipped; one task left -> zero
    loss that can still be added to a loss with a graph and back-propagated."""
    z, mask, task = batch()
    mask[task == 2] = False
    mask[1, :] = False
    mask[4, :] = False
    mask[4, 3] = True                      # task 1 keeps a single token
    assert len(task_groups(z, mask, task)) == 1
    assert len(task_groups(z, mask, torch.tensor([0, 0, 1, 2, 2, 2]), position_wise=True)) == 2
    w = torch.ones(4, requires_grad=True)
    for kind in ("kl", "mmd"):
        zz = z * w
        loss = loss_fn({"m": zz}, mask, task, kind=kind)
        assert loss.item() == 0.0
        (zz.sum() + loss).backward()       # safe to add to the LM loss
    assert w.grad is not None


@BOTH
@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("position_wise", [False, True])
def test_masked_positions_do_not_change_the_loss(loss_fn, kind, position_wise):
    """Changing the A-output at masked (pad/prompt) positions, to huge values or even inf/NaN, leaves the loss
    unchanged and gives those positions an exactly zero gradient."""
    z, mask, task = batch()
    z1 = z.clone().requires_grad_()
    junk = torch.full_like(z, 1e4)
    junk[0, :, 0], junk[1, :, 1] = float("nan"), float("inf")
    z2 = torch.where(mask[..., None], z, junk).requires_grad_()
    l1 = loss_fn({"m": z1}, mask, task, kind=kind, position_wise=position_wise)
    l2 = loss_fn({"m": z2}, mask, task, kind=kind, position_wise=position_wise)
    assert l1.item() > 0
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    l2.backward()
    assert bool((z2.grad[~mask] == 0).all()) and bool((z2.grad[mask] != 0).any())


@BOTH
def test_alignment_loss_reduces_over_modules(loss_fn):
    """module_reduction mean (code) / sum: the average / sum of the per-module losses on each module's groups."""
    alignment_loss = loss_fn
    z, mask, task = batch()
    outs = {"a": z, "b": z * 2 + 1, "c": z.flip(0)}
    per = [kl_alignment_loss(task_groups(v, mask, task)) for v in outs.values()]
    torch.testing.assert_close(alignment_loss(outs, mask, task), torch.stack(per).mean())
    torch.testing.assert_close(alignment_loss(outs, mask, task, module_reduction="sum"), torch.stack(per).sum())
    per = [mmd_alignment_loss(task_groups(v, mask, task, position_wise=True), max_rows=2, pair_reduction="sum")
           for v in outs.values()]
    got = alignment_loss(outs, mask, task, kind="mmd", position_wise=True, pair_reduction="sum", max_rows=2)
    torch.testing.assert_close(got, torch.stack(per).mean())
    # token-level MMD (computed for all modules at once) equals the per-module losses too, in value and gradient
    zs = {k: v.detach().requires_grad_() for k, v in outs.items()}
    per = torch.stack([mmd_alignment_loss(task_groups(v, mask, task), max_rows=3) for v in zs.values()])
    got = alignment_loss(zs, mask, task, kind="mmd", max_rows=3)
    torch.testing.assert_close(got, per.mean())
    g_ref = torch.autograd.grad(per.mean(), list(zs.values()))
    g_got = torch.autograd.grad(alignment_loss(zs, mask, task, kind="mmd", max_rows=3), list(zs.values()))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)


def test_bad_input_gives_clear_errors():
    """Wrong kind, reductions or shapes raise ValueError naming the problem (the fast form, which training calls
    with the user's flags, checks its arguments; the book's groups must agree in positions and rank)."""
    alignment_loss = fast.alignment_loss
    z, mask, task = batch()
    with pytest.raises(ValueError, match="kind"):
        alignment_loss({"m": z}, mask, task, kind="cka")
    with pytest.raises(ValueError, match="module_reduction"):
        alignment_loss({"m": z}, mask, task, module_reduction="max")
    with pytest.raises(ValueError, match="pair_reduction"):
        alignment_loss({"m": z}, mask, task, pair_reduction="max")
    with pytest.raises(ValueError, match="token_mask"):
        alignment_loss({"m": z}, mask[:, :3], task)
    with pytest.raises(ValueError, match="task_ids"):
        alignment_loss({"m": z}, mask, task[:2])
    with pytest.raises(ValueError, match="no A-outputs"):
        alignment_loss({}, mask, task)
    with pytest.raises(ValueError, match="same positions"):
        kl_alignment_loss([torch.randn(4, 3), torch.randn(4, 5)])
    with pytest.raises(ValueError, match="pair_reduction"):
        kl_alignment_loss([torch.randn(4, 3), torch.randn(4, 3)], pair_reduction="max")


def old_formula(zs, mask, task, kind, position_wise, pair_reduction, module_reduction, num_tasks, max_rows, sigmas):
    """The alignment loss as it was computed before the fixed-shape version: per module, task_groups cuts the
    groups out (boolean indexing), MMD keeps linspace-spaced rows per group, then per task pair and position
    torch.distributions' KL or the naive MMD loop on the counted rows, averaged over the valid positions."""
    per_module = []
    for z in zs.values():
        groups = task_groups(z.double(), mask, task, num_tasks, position_wise)
        groups = [g if position_wise else (g[:, None], torch.ones(len(g), 1, dtype=torch.bool)) for g in groups]
        if kind == "mmd" and max_rows is not None:
            groups = [(x[i], m[i]) for x, m in groups
                      for i in [torch.linspace(0, len(x) - 1, max_rows).round().long() if len(x) > max_rows
                                else torch.arange(len(x))]]
        terms = []
        for (xa, ma), (xb, mb) in itertools.combinations(groups, 2):
            need = 2 if kind == "kl" else 1
            d = [ref_sym_kl(xa[ma[:, s], s], xb[mb[:, s], s], 1e-8) if kind == "kl" else
                 naive_mmd(xa[ma[:, s], s], xb[mb[:, s], s], sigmas)
                 for s in range(xa.shape[1]) if ma[:, s].sum() >= need and mb[:, s].sum() >= need]
            if d:
                terms.append(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in d]).mean())
        t = torch.stack(terms) if terms else torch.zeros(1, dtype=torch.float64)
        per_module.append(t.mean() if pair_reduction == "mean" and terms else t.sum())
    per_module = torch.stack(per_module)
    return per_module.mean() if module_reduction == "mean" else per_module.sum()


@BOTH
@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("position_wise", [False, True])
def test_alignment_loss_equals_old_formula_on_random_batches(loss_fn, kind, position_wise):
    """Random batches with padding, an absent task, a task with a single example and one with a single counted
    token, both reductions, row caps that bind and that do not: the fixed-shape loss equals the old formula
    (old_formula) to float64 round-off."""
    g = torch.Generator().manual_seed(7)
    for trial in range(6):
        B, T, r = 7, 5, 3
        zs = {f"m{i}": torch.randn(B, T, r, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(2)}
        mask = torch.rand(B, T, generator=g) > 0.3
        task = torch.tensor([0, 0, 1, 1, 1, 3, 0])             # task 2 absent, task 3 has one example
        if trial % 2:
            mask[2:5] = False
            mask[3, 1] = True                                  # task 1: a single counted token
        kw = dict(kind=kind, position_wise=position_wise, pair_reduction=["mean", "sum"][trial % 2],
                  module_reduction=["mean", "sum"][trial // 3], num_tasks=4 if trial % 3 else None)
        cap = [None, 2, 4][trial % 3] if kind == "mmd" else None
        extra = dict(max_rows=cap, sigmas=[0.5, 2.0, 10.0]) if kind == "mmd" else {}
        got = loss_fn(zs, mask, task, **kw, **extra)
        want = old_formula(zs, mask, task, **kw, max_rows=cap, sigmas=[0.5, 2.0, 10.0])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"trial {trial} {kw} cap={cap}")


@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("position_wise", [False, True])
def test_alignment_loss_has_no_data_dependent_host_reads(kind, position_wise):
    """With num_tasks given, dynamo traces fast.alignment_loss as one graph (fullgraph=True): no .item(),
    bool(tensor), nonzero or boolean indexing, each of which would be a graph break here and a host sync on a GPU.
    The traced loss equals the eager one."""
    alignment_loss = fast.alignment_loss
    torch._dynamo.reset()
    z, mask, task = batch()
    zs = {"a": z, "b": z * 2 + 1}
    traced = torch.compile(alignment_loss, backend="eager", fullgraph=True)
    kw = dict(kind=kind, position_wise=position_wise, num_tasks=3)
    torch.testing.assert_close(traced(zs, mask, task, **kw), alignment_loss(zs, mask, task, **kw))


@BOTH
def test_mmd_fp32_gradient_with_duplicate_rows(loss_fn):
    """A shared prompt prefix makes A-outputs identical across examples and tasks, and near-duplicates happen: at
    such pairs the σ=1e-6 kernel's slope is ~5e5. The fp32 gradient still matches the float64 one (and the old
    formula's, autograd through cdist) to fp32 round-off: no cancellation of huge terms."""
    alignment_loss = loss_fn
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 6, 4, generator=g)
    z[:, :2] = z[0, :2]                                          # identical prefix rows
    z[3, 4] = z[2, 4] + 1e-3 * torch.randn(4, generator=g)      # a near-duplicate in another task
    mask, task = torch.ones(8, 6, dtype=torch.bool), torch.arange(8) % 3
    grads = []
    for dtype in (torch.float64, torch.float32):
        zz = z.to(dtype, copy=True).requires_grad_()
        (gz,) = torch.autograd.grad(alignment_loss({"m": zz}, mask, task, kind="mmd", max_rows=None), zz)
        grads.append(gz.double())
    ref = old_formula({"m": z.double()}, mask, task, "mmd", False, "mean", "mean", None, None, MMD_SIGMAS)
    torch.testing.assert_close(alignment_loss({"m": z.double()}, mask, task, kind="mmd", max_rows=None), ref)
    assert (grads[1] - grads[0]).abs().max() < 1e-5 * grads[0].abs().max()


def test_mmd_row_cap_picks_linspace_rows():
    """The row cap keeps, for every group at once, the rows torch.linspace(0, n-1, m).round() picks (the old
    per-group subsampling), for every group size n and cap m up to 70; smaller groups keep all their rows."""
    from nanoalign.plumbing.fast import _pick_rows
    for n in range(1, 140):
        for m in range(1, 70):
            member = torch.zeros(2, n + 5, dtype=torch.bool)
            member[0, 5:] = True                                # group 0: rows 5.., group 1: rows 0..4
            member[1, :5] = True
            idx, keep = _pick_rows(member, m)
            want = torch.linspace(0, n - 1, m).round().long() if n > m else torch.arange(n)
            assert torch.equal(idx[0][keep[0]] - 5, want), (n, m)
            assert torch.equal(idx[1][keep[1]], torch.linspace(0, 4, m).round().long() if m < 5 else torch.arange(5))


def test_mmd_default_row_cap():
    """By default MMD keeps MMD_MAX_ROWS evenly spaced rows per task (the same loss as passing that cap and as
    the naive MMD on those rows); max_rows=None keeps all rows."""
    from nanoalign.align import MMD_MAX_ROWS
    a, b = rand_groups([MMD_MAX_ROWS + 21, MMD_MAX_ROWS + 5], r=2, dtype=torch.float32)
    capped = mmd_alignment_loss([a, b])
    torch.testing.assert_close(capped, mmd_alignment_loss([a, b], max_rows=MMD_MAX_ROWS), rtol=0, atol=0)
    pick = lambda x: x[torch.linspace(0, len(x) - 1, MMD_MAX_ROWS).round().long()]
    torch.testing.assert_close(capped.double(), naive_mmd(pick(a), pick(b)), rtol=1e-5, atol=1e-6)
    assert (mmd_alignment_loss([a, b], max_rows=None) - capped).abs() > 1e-6


# ----------------------------------------------------------------------------- the fast form equals the book's

def random_case(g, trial, dtype):
    """A batch with padding/prompt masks, a task absent (2), a task with one example (3), on odd trials a task with
    a single counted token; three modules (batched as one in the fast form), the last of another rank on trial 5."""
    B, T, r = 8, 6, 4
    zs = {f"m{i}": (torch.randn(B, T, r, generator=g) * (1 + i) + i).to(dtype) for i in range(3)}
    if trial == 5:
        zs["m2"] = torch.randn(B, T, 2, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    task = torch.tensor([0, 0, 1, 1, 1, 3, 0, 4])
    if trial % 2:
        mask[2:5] = False
        mask[3, 1] = True
    return zs, mask, task


@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("position_wise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_equals_book_values_and_gradients(kind, position_wise, dtype):
    """fast.alignment_loss equals the book's align.alignment_loss in value and in the gradient of every A-output:
    masked rows, an absent task, one-example and one-token tasks, modules of two shapes, both reductions, num_tasks
    given or found, MMD row caps that bind and that do not. fp32: within 1e-6 (relative, and absolute for the
    gradients relative to their largest entry); fp64: 1e-12. Not bitwise: the fast form sums in another order."""
    g = torch.Generator().manual_seed(11)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    positive = 0
    for trial in range(6):
        zs, mask, task = random_case(g, trial, dtype)
        kw = dict(kind=kind, position_wise=position_wise, pair_reduction=["mean", "sum"][trial % 2],
                  module_reduction=["mean", "sum"][trial // 3], num_tasks=5 if trial % 3 else None)
        if kind == "mmd":
            kw.update(max_rows=[None, 2, 4][trial % 3], sigmas=[0.5, 2.0, 10.0] if trial % 2 else None)
        out = []
        for loss_fn in (align.alignment_loss, fast.alignment_loss):
            leaves = {k: v.clone().requires_grad_() for k, v in zs.items()}
            loss = loss_fn(leaves, mask, task, **kw)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) if loss.requires_grad else ()
            out.append((loss, [v * 0 if i >= len(grads) or grads[i] is None else grads[i]
                               for i, v in enumerate(leaves.values())]))
        (book, g_book), (quick, g_quick) = out
        assert book.dtype == quick.dtype == dtype
        positive += int(book > 0)
        torch.testing.assert_close(quick, book, rtol=tol, atol=0, msg=f"trial {trial} {kw}")
        for a, b in zip(g_quick, g_book):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=f"trial {trial} {kw}")
    assert positive >= 3


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_fast_equals_book_on_single_task_and_bf16_batches(kind):
    """A batch of one task: both forms give exactly 0, safe to add to a loss, and no gradient. bf16 A-outputs
    (autocast): both compute in fp32 and agree within 1e-6."""
    z, mask, _ = batch()
    one = torch.zeros(6, dtype=torch.long)
    for loss_fn in (align.alignment_loss, fast.alignment_loss):
        for num_tasks in (None, 3):
            zz = z.clone().requires_grad_()
            loss = loss_fn({"m": zz}, mask, one, kind=kind, num_tasks=num_tasks)
            assert loss.item() == 0.0
            (zz.sum() * 0 + loss).backward()
            assert bool((zz.grad == 0).all())
    z16, task = z.bfloat16(), torch.tensor([0, 1, 2, 0, 1, 2])
    book, quick = (f({"m": z16}, mask, task, kind=kind) for f in (align.alignment_loss, fast.alignment_loss))
    assert book.dtype == quick.dtype == torch.float32
    torch.testing.assert_close(quick, book, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- through a real model and adapters

def tiny_adapted_model(kind, seed=0):
    """A 2-layer random Llama-style CausalLM with `kind` adapters on all 7 projections, B made non-zero."""
    from nanoalign.adapters import apply_adapter
    from nanoalign.model import CausalLM, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = CausalLM(cfg)
    apply_adapter(model, kind, rank=4, alpha=8, heads=3, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)   # LoRA starts at B = 0; a non-zero B makes every gradient path live
    return model.train()


def model_batch(B=6, T=9, seed=0):
    """Right-padded batch, two examples per task; token_mask drops padding and a 3-token 'prompt'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (B, T), generator=g)
    lengths = torch.tensor([9, 7, 8, 6, 9, 5])[:B]
    attn = torch.arange(T)[None] < lengths[:, None]
    token_mask = attn & (torch.arange(T)[None] >= 3)
    return ids, attn, token_mask, torch.tensor([0, 1, 2, 0, 1, 2])[:B]


def align_grads(model, kind, modules=None, loss_fn=alignment_loss, **kw):
    """d L_align / d (every lora_* parameter), None where unused; L_align over `modules` (all when None)."""
    from nanoalign.adapters import adapter_context

    ids, attn, token_mask, task = model_batch()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with adapter_context(model, task_ids=task, collect=True) as ctx:
        model(ids, attn)
        outs = ctx.a_outputs if modules is None else {m: ctx.a_outputs[m] for m in modules}
        loss = loss_fn(outs, token_mask, task, kind=kind, **kw)
        # backward inside the block: a checkpointed forward is re-run during it (adapters.adapter_context)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss, dict(zip(params, grads)), sorted(ctx.a_outputs)


def is_zero(g):
    return g is None or bool((g == 0).all())


@BOTH
@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_alignment_gradient_reaches_every_A_and_never_the_own_B(loss_fn, kind):
    """LoRA with random non-zero B: the alignment gradient reaches every lora_A. A module's own alignment term
    never reaches its own lora_B (B acts after the aligned A-output). Through the residual stream it does reach
    the B of every module that feeds a later adapted module — all but the last layer's down_proj, whose output
    feeds no adapter — so 'never B' holds per module, not for the summed loss."""
    pytest.importorskip("nanoalign.adapters")
    model = tiny_adapted_model("lora")
    loss, grads, names = align_grads(model, kind, loss_fn=loss_fn)
    assert len(names) == 14 and loss.item() > 0
    for n in names:
        assert not is_zero(grads[f"{n}.lora_A.weight"]), n
    last_down = "model.layers.1.mlp.down_proj"
    assert {n for n in names if is_zero(grads[f"{n}.lora_B.weight"])} == {last_down}
    for n in ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj",
              last_down]:
        _, own, _ = align_grads(model, kind, modules=[n], loss_fn=loss_fn)
        assert is_zero(own[f"{n}.lora_B.weight"]) and not is_zero(own[f"{n}.lora_A.weight"]), n


def test_alignment_gradient_on_rlora_reaches_its_A_only():
    """R-LoRA (tutorial 09's mechanism): its A-output is the shared A·x, so one module's alignment loss is defined,
    finite and positive there, and of that module's tensors it reaches A only, never its heads B_i or its router."""
    model = tiny_adapted_model("rlora")
    for n in ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        loss, own, _ = align_grads(model, "kl", modules=[n])
        assert torch.isfinite(loss) and loss.item() > 0
        assert not is_zero(own[f"{n}.lora_A.weight"]), n
        assert is_zero(own[f"{n}.lora_B.weight"]) and is_zero(own[f"{n}.lora_router.weight"]), n


@BOTH
@pytest.mark.parametrize("adapter,kind,position_wise",
                         [("lora", "kl", False), ("lora", "mmd", True), ("mlora", "kl", True), ("mlora", "mmd", False)])
def test_alignment_gradient_same_with_gradient_checkpointing(loss_fn, adapter, kind, position_wise):
    """Same model, inputs and seed (dropout 0): the alignment loss and its gradient on every trainable parameter
    are the same with model.gradient_checkpointing on and off (non-reentrant recomputation), for LoRA and for the
    multi-head M-LoRA."""
    pytest.importorskip("nanoalign.adapters")
    model = tiny_adapted_model(adapter)
    model.gradient_checkpointing = False
    l0, g0, _ = align_grads(model, kind, position_wise=position_wise, loss_fn=loss_fn)
    model.gradient_checkpointing = True
    l1, g1, _ = align_grads(model, kind, position_wise=position_wise, loss_fn=loss_fn)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys()
    nonzero = 0
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
            nonzero += int(not is_zero(g0[n]))
    assert nonzero >= 14   # at least every lora_A got a gradient
