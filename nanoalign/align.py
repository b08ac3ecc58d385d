"""Align-LoRA's alignment losses: pull the per-task distributions of LoRA A-outputs together.

Paper: "Align, Don't Divide" (Align-LoRA, arXiv 2508.05078), METHODS.md §2.10 and §3. One plain LoRA is trained
on a task mixture with

    L = L_LM + λ · L_align,      L_align = mean over adapted modules m of  reduce_{p<q} D(Z_m[task p], Z_m[task q])

where Z_m = A_m · drop(X_m) ∈ R^{B×T×r} is module m's A-output (the down-projection, METHODS §3.1) and D is

    A-LoRA-K  symmetric KL between per-task diagonal Gaussians   (kl_alignment_loss,  §3.3)
    A-LoRA-M  multi-kernel Gaussian MMD²                         (mmd_alignment_loss, §3.4)

        Z_m [B, T, r] ──task_groups──▶ [rows of task 0], [rows of task 1], ...  ──D over pairs──▶ scalar
              (token_mask, task_ids)      token-level [N_t, r]  or  position-wise ([N_t, T, r], mask)

How it is computed: the groups are never cut out of Z (that needs the group sizes on the host: a sync per task on
a GPU). All rows stay in one tensor and each task gets a 0/1 weight per row and position (its one-hot task ids
times the token mask); means, variances and kernel means are weighted sums with those weights. Every shape is
known from the input shapes, so alignment_loss runs without host syncs (pass num_tasks; without it the task ids
present are looked up once). task_groups still cuts the groups out, for analysis and as the tests' reference.

Deviations from the released code (METHODS §3.6), on purpose:
  * computed per micro-batch from explicit task ids (the caller's task-balanced batches), not pooled over the
    accumulation window and regrouped by position (the released sampler is never used and the split is wrong:
    §3.6 items 1-2);
  * padding and, by default, prompt tokens are masked out (the code includes padding), and the default pooling is
    token-level (μ_t, σ²_t ∈ R^r over all counted tokens of task t); `position_wise=True` keeps the code's per-position
    statistics, with masked positions excluded from them (pass an all-True mask to include padding as the code does);
  * fp32 throughout (the code runs KL/MMD in bf16 and stores the MMD bandwidths in bf16), autocast disabled inside;
  * MMD keeps at most MMD_MAX_ROWS (32) evenly spaced rows per task by default (the code compares ~10 examples per
    task and position; token-level groups have thousands of rows, and the kernel grows with their square);
  * the A-outputs come from the forward itself (no hooks) and the loss goes into the same backward as the LM loss,
    so no graph is stale and (non-reentrant) gradient checkpointing gives the same gradient (§3.6 item 3).

Where the gradient goes: every lora_A, never a module's own lora_B (B acts after the aligned A-output). It does
reach the B (and A) of every earlier module whose output feeds a later adapted module through the residual stream;
only B's downstream of all aligned modules (e.g. the last layer's down_proj) get none from L_align.

λ conventions (§3.5, §3.7). The code adds λ=0.2 · (mean over pairs, mean over modules) once per optimizer step, on
the last micro-step, whose loss is divided by grad_accum: relative to the mean LM loss its weight is λ/grad_accum
(0.02 for the released 10 steps). Here the loss is added on every micro-step like the LM loss, so emulating the code
means λ_eff = λ/grad_accum with pair_reduction="mean", module_reduction="mean". The paper (per reviews) uses λ≈0.1
on a SUM over pairs (pair_reduction="sum"); whether it also sums over modules is not stated.
"""

import torch

# METHODS §3.4: the released code's 19 bandwidths. σ enters un-squared, exp(-‖u-v‖²/(2σ)), so it acts as a variance.
# Kept in fp32 (the code stores them in bf16, which rounds e.g. 0.1 -> 0.10009765625 and 1e4 -> 9984); pass
# `sigmas=torch.tensor(MMD_SIGMAS).bfloat16().tolist()` to reproduce that rounding.
MMD_SIGMAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
              1e3, 1e4, 1e5, 1e6)
# Default cap on the rows per task for MMD (evenly spaced, deterministic; None keeps all). The kernel costs
# (tasks · rows)² · 19 exponentials per module and position, KL a few passes over the rows. Measured on the 2-core
# CPU for 210 modules (SmolLM2, all linear, r=32), 8 x 128 tokens, 4 tasks, loss forward + backward in CPU
# seconds: KL 0.1-0.4; MMD 0.8-1.2 with 32 rows per task, 2.9-4.4 with 64, 47 with all 256 (the old code, which
# kept all rows by default: 68). Against a ~4 s step, 32 keeps an MMD step within the 1.25x-a-KL-step target
# (benchmarks/RESULTS.md). On a GPU the exponentials are cheap: raise it with max_rows=.
MMD_MAX_ROWS = 32
KERNEL_CHUNK = 2 ** 26  # elements of [positions, rows, rows, bandwidths] evaluated at once (256 MB in fp32)


# ----------------------------------------------------------------------------- rows with per-group weights
#
# Every loss below works on one representation of its groups, with shapes fixed by the input shapes:
#   x      [R, S, k]  all rows (examples or tokens) at S positions, zero where not counted
#   w      [G, R, S'] 1 where row r counts for group g at position s (S' = 1: the same at every position)
#   member [G, R]     rows that belong to group g (at most one group per row; what max_rows subsamples)
#   ok     [G]        groups that take part (task_groups' rule: at least 2 rows, or 2 examples position-wise)

def _masked_groups(groups):
    """Groups -> list of (x [N, S, r] fp32, w [N, S] bool). Token-level [N, r] becomes one position S=1.

    A group is a tensor [N, r] (token rows), a tensor [N, S, r] (examples x positions), or a pair
    (tensor [N, S, r], mask [N, S] bool) whose False entries are left out of the statistics.
    """
    out = []
    for g in groups:
        x, m = g if isinstance(g, (tuple, list)) else (g, None)
        if x.ndim == 2:
            x = x[:, None]
            m = None if m is None else m[:, None]
        if x.ndim != 3 or (m is not None and m.shape != x.shape[:2]):
            raise ValueError(f"an alignment group must be [N, r], [N, S, r] or ([N, S, r], mask [N, S]); got "
                             f"{tuple(x.shape)}" + ("" if m is None else f" with mask {tuple(m.shape)}"))
        m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if m is None else m.bool()
        out.append((_counted(x, m), m))
    if len({x.shape[1:] for x, _ in out}) > 1:
        raise ValueError(f"all alignment groups need the same positions and rank; got "
                         f"{sorted({tuple(x.shape[1:]) for x, _ in out})}")
    return out


def _counted(x, m):
    """x in fp32 (bf16/fp16 -> fp32; fp64 stays, for gradcheck) with the entries where m is False set to 0.
    where, not multiply: a masked entry contributes nothing and gets an exactly zero gradient, even if NaN."""
    return torch.where(m[..., None], x.to(torch.promote_types(x.dtype, torch.float32)), 0.0)


def _stack_groups(groups):
    """A list of groups (see _masked_groups) -> the rows of all groups in one tensor, with their weights."""
    gs = _masked_groups(groups)
    x = torch.cat([x for x, _ in gs])
    g = torch.cat([torch.full((len(m),), i, device=x.device) for i, (_, m) in enumerate(gs)])
    member = g[None] == torch.arange(len(gs), device=x.device)[:, None]
    w = member[:, :, None] & torch.cat([m for _, m in gs])[None]
    return x, w, member, torch.ones(len(gs), dtype=torch.bool, device=x.device)


def _wsum(w, x):
    """Σ_r w[g, r, s] · x[r, s, :] -> [G, S, k]; a w without per-position weights is one matmul."""
    if w.shape[2] == 1:
        return (w[:, :, 0] @ x.flatten(1)).view(w.shape[0], *x.shape[1:])
    return torch.einsum("grs,rsk->gsk", w, x)


def _reduce_pairs(D, valid, pair_reduction):
    """D, valid: [P, S] per unordered task pair and position -> scalar.

    Each pair averages D over the positions valid for both tasks; pairs with no valid position are dropped; then
    mean (the code) or sum (the paper) over the remaining pairs. Masked sums, no host sync; no pair left -> 0.
    """
    n = valid.sum(-1)
    per_pair = torch.where(valid, D, 0.0).sum(-1) / n.clamp(min=1)
    keep = n > 0
    total = torch.where(keep, per_pair, 0.0).sum()
    return total / keep.sum().clamp(min=1) if pair_reduction == "mean" else total


def _check_and_zero(groups, pair_reduction):
    """Validate the reduction; for fewer than 2 groups return the plain zero loss (None otherwise)."""
    if pair_reduction not in ("mean", "sum"):
        raise ValueError(f"pair_reduction must be 'mean' or 'sum', got {pair_reduction!r}")
    if len(groups) >= 2:
        return None
    first = groups[0][0] if groups and isinstance(groups[0], (tuple, list)) else groups[0] if groups else None
    return torch.zeros((), device=None if first is None else first.device)


def _no_autocast(x):
    """fp32 on purpose: under bf16 autocast the variances and kernels would lose the digits they need."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ----------------------------------------------------------------------------- KL (A-LoRA-K)

def kl_alignment_loss(groups, eps=1e-8, pair_reduction="mean"):
    """A-LoRA-K (METHODS §3.3): symmetric KL between per-task diagonal Gaussians, reduced over task pairs.

    Per task t: μ_t = mean of its rows, σ²_t = unbiased variance (N-1), per rank dim (and per position for
    [N, S, r] groups, counting only unmasked rows at each position). With v = σ² + eps,

        KL(p‖q) = ½ Σ_k [ log v_q − log v_p + v_p/v_q + (μ_q − μ_p)²/v_q − 1 ],   D = ½ [KL(p‖q) + KL(q‖p)]

    summed over the r dims, averaged over positions (position-wise groups; positions where either task has fewer
    than 2 rows are skipped), then mean (code) or sum (paper) over unordered task pairs. fp32. Fewer than 2 groups:
    a plain zero (safe to add to the LM loss). Groups: see `_masked_groups`.
    """
    zero = _check_and_zero(groups, pair_reduction)
    return zero if zero is not None else _kl(_stack_groups(groups), eps, pair_reduction)


def _kl(rows, eps=1e-8, pair_reduction="mean"):
    x, w, member, ok = rows
    w = w.to(x.dtype)
    G = w.shape[0]
    with _no_autocast(x):
        n = w.sum(1)[..., None]                                          # [G, S', 1]
        mu = _wsum(w, x) / n.clamp(min=1)                                # [G, S, k]
        # each row centred on its own group's mean (two passes, as the variance is usually computed); the one-hot
        # matmul picks that mean exactly and, unlike indexing, has a matmul for its backward
        d = x - (member.t().to(x.dtype) @ mu.flatten(1)).view_as(x)
        var = _wsum(w, d * d) / (n - 1).clamp(min=1)
        valid = ((n[..., 0] >= 2) & ok[:, None]).expand(mu.shape[:2])    # [G, S]
        # invalid positions get harmless stand-ins: their D is discarded, and finite values keep the
        # gradient finite too (a NaN in a discarded branch of `where` still poisons the backward)
        mu = torch.where(valid[..., None], mu, 0.0)
        v = torch.where(valid[..., None], var, 1.0) + eps
        p, q = torch.triu_indices(G, G, 1, device=x.device)              # unordered pairs p < q
        mp, mq, vp, vq = mu[p], mu[q], v[p], v[q]                        # [P, S, r]
        kl_pq = 0.5 * (vq.log() - vp.log() + vp / vq + (mq - mp) ** 2 / vq - 1).sum(-1)  # KL(p‖q) [P, S]
        kl_qp = 0.5 * (vp.log() - vq.log() + vq / vp + (mp - mq) ** 2 / vp - 1).sum(-1)  # KL(q‖p)
        return _reduce_pairs(0.5 * (kl_pq + kl_qp), valid[p] & valid[q], pair_reduction)


# ----------------------------------------------------------------------------- MMD (A-LoRA-M)

def mmd_alignment_loss(groups, sigmas=None, max_rows=MMD_MAX_ROWS, pair_reduction="mean"):
    """A-LoRA-M (METHODS §3.4): multi-kernel Gaussian MMD² between task groups, reduced over task pairs.

        k(u, v) = Σ_σ exp(−‖u − v‖² / (2σ))     σ ∈ MMD_SIGMAS (19 values, σ UN-squared: it acts as a variance)
        MMD²(p, q) = mean k(x_p, x_p) + mean k(x_q, x_q) − 2 mean k(x_p, x_q)

    Biased V-statistic (all row pairs, diagonal included), ‖·‖² over the r dims. Position-wise groups compare rows
    at the same position only and average MMD² over positions where both tasks have ≥1 unmasked row. Mean (code)
    or sum (paper) over unordered task pairs. fp32, bandwidths in fp32 (the code: bf16). Fewer than 2 groups: zero.

    Cost: one kernel matrix over the rows R of all groups per position, all bandwidths in one evaluation, in
    chunks of positions; the backward keeps the distances and k'(d) (GaussianKernels). `max_rows` keeps that many
    evenly spaced rows per group (deterministic; default MMD_MAX_ROWS; None: all rows, at R² cost).
    """
    zero = _check_and_zero(groups, pair_reduction)
    return zero if zero is not None else _mmd(_stack_groups(groups), sigmas, max_rows, pair_reduction)


def _mmd(rows, sigmas=None, max_rows=MMD_MAX_ROWS, pair_reduction="mean"):
    x, w, member, ok = rows
    sig = torch.tensor(MMD_SIGMAS if sigmas is None else [float(s) for s in sigmas], dtype=x.dtype, device=x.device)
    w = w.to(x.dtype)
    G = w.shape[0]
    if max_rows is not None and max_rows < x.shape[0]:
        idx, keep = _pick_rows(member, int(max_rows))                    # [G, m] rows of each group
        x = x[idx.flatten()]                                             # [G·m, S, k], group by group
        own = w[torch.arange(G, device=x.device)[:, None], idx] * keep[..., None]     # [G, m, S']
        w = (torch.eye(G, dtype=w.dtype, device=x.device)[:, :, None, None] * own[None]).flatten(1, 2)
    with _no_autocast(x):
        K = _kernel_means(x, w, sig)                                     # [S, G, G]
        p, q = torch.triu_indices(G, G, 1, device=x.device)
        D = (K[:, p, p] + K[:, q, q] - 2 * K[:, p, q]).t()               # [P, S]
        present = ((w.sum(1) > 0) & ok[:, None]).expand(G, x.shape[1])   # ≥1 row of the group at that position
        return _reduce_pairs(D, present[p] & present[q], pair_reduction)


def _pick_rows(member, m):
    """For every group at once, the rows evenly spaced subsampling keeps: (idx [G, m], keep [G, m]).

    A group with more than m rows keeps the ones torch.linspace(0, n-1, m).round() picks among its rows in order
    (the same float32 arithmetic as linspace, so the same rows); a smaller group keeps all (keep marks them).
    """
    n = member.sum(1)[:, None]                                           # [G, 1]
    i = torch.arange(m, device=member.device)
    last = (n - 1).float()
    step = last / max(m - 1, 1)
    pos = torch.where(i < m // 2, step * i, last - step * (m - 1 - i)).round().long() if m > 1 else 0 * i
    want = torch.where(n > m, pos, i)
    idx = torch.searchsorted(member.long().cumsum(1), want + 1)          # the (want+1)-th row of the group
    return idx.clamp(max=member.shape[1] - 1), i < n.clamp(max=m)


def _kernel_means(x, w, sig):
    """[S, G, G]: per position, the mean over counted row pairs (r in p, t in q) of Σ_σ exp(−‖x_r − x_t‖² / (2σ)),
    in chunks of positions so that the [positions, R, R, bandwidths] exponentials stay within KERNEL_CHUNK."""
    R, S = x.shape[:2]
    chunk = max(1, KERNEL_CHUNK // (R * R * len(sig)))
    return torch.cat([_kernel_means_chunk(x[:, s:s + chunk], w if w.shape[2] == 1 else w[:, :, s:s + chunk], sig)
                      for s in range(0, S, chunk)])


def _kernel_means_chunk(x, w, sig):
    xs = x.transpose(0, 1)                                               # [S, R, k]
    # exact differences (not the |x|²+|y|²−2xy expansion): with σ down to 1e-6 the round-off of the expansion
    # (~1e-7·|x|²) would turn exp(−0/2σ)=1 into ~0.6 on the diagonal
    d = torch.cdist(xs, xs, compute_mode="donot_use_mm_for_euclid_dist") ** 2          # [S, R, R]
    k = GaussianKernels.apply(d, sig)
    ws = w.permute(2, 0, 1)                                              # [S', G, R]
    n = ws.sum(-1)
    return ws @ k @ ws.transpose(1, 2) / (n[:, :, None] * n[:, None, :]).clamp(min=1)


class GaussianKernels(torch.autograd.Function):
    """k(d) = Σ_σ exp(−d/(2σ)) for squared distances d, all bandwidths in one evaluation.

    Autograd would keep the [.., n_σ] exponentials for the backward (19x the kernel); this keeps only the
    derivative k'(d) = Σ_σ −exp(−d/(2σ))/(2σ), computed from them in the same pass.
    """

    @staticmethod
    def forward(ctx, d, sig):
        c = -0.5 / sig
        e = (d[..., None] * c).exp_()                                    # [.., n_σ]: exp(−d/(2σ))
        ctx.save_for_backward(e @ c)
        return e.sum(-1)

    @staticmethod
    def backward(ctx, g):
        (dk,) = ctx.saved_tensors
        return g * dk, None


# ----------------------------------------------------------------------------- grouping by task

def _check_batch(a_output, token_mask, task_ids):
    if a_output.ndim != 3:
        raise ValueError(f"a_output must be [B, T, r], got shape {tuple(a_output.shape)}")
    B, T, _ = a_output.shape
    if token_mask.shape != (B, T):
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, expected {(B, T)} like the A-output")
    if task_ids.shape != (B,):
        raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}, expected ({B},): one task id per example")


def _task_onehot(task_ids, num_tasks=None):
    """[G, B] bool, example b is of task g: tasks 0..num_tasks-1, or the sorted ids present when num_tasks is None
    (unique() has a data-dependent size: one host sync). Ids are range-checked when they are on the CPU in eager mode
    (on a GPU that would be a sync; ids outside [0, num_tasks) then belong to no task)."""
    if num_tasks is None:
        return task_ids[None] == task_ids.unique()[:, None]
    on_host = task_ids.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and bool(((task_ids < 0) | (task_ids >= num_tasks)).any()):
        raise ValueError(f"task_ids must lie in [0, {num_tasks}), got {sorted(set(task_ids.tolist()))}")
    return task_ids[None] == torch.arange(num_tasks, device=task_ids.device)[:, None]


def task_groups(a_output, token_mask, task_ids, num_tasks=None, position_wise=False):
    """Split one module's A-output [B, T, r] into per-task groups (METHODS §3.2, §3.7).

    token_mask [B, T] bool: which tokens count (the caller masks padding and, by default, prompt tokens).
    task_ids [B] int: the task of each example. Groups come in task-id order (0..num_tasks-1, or the sorted ids
    present when num_tasks is None); a task with fewer than 2 rows is skipped (its variance is undefined), so a
    batch with fewer than 2 usable tasks gives a zero alignment loss — use task-balanced batches.

    token-level (default): task t's group is its counted tokens, [N_t, r] (row-major order).
    position_wise: task t's group is (a_output[examples of t] [n_t, T, r], token_mask[examples of t] [n_t, T]);
    statistics are taken per absolute position over the examples whose token counts there (masked entries are
    left out, not zeroed in). With an all-True mask this is the released code's per-position statistic, padding
    included; with prompts or padding masked, only positions that both tasks share are compared.

    Cutting the groups out needs their sizes on the host (syncs on a GPU); alignment_loss computes the same
    groups as weights instead (module docstring). This is for analysis and the tests.
    """
    _check_batch(a_output, token_mask, task_ids)
    token_mask = token_mask.bool().to(a_output.device)
    groups = []
    for ex in _task_onehot(task_ids.to(a_output.device), num_tasks):
        if position_wise:
            if int(ex.sum()) >= 2:
                groups.append((a_output[ex], token_mask[ex]))
        else:
            rows = a_output[token_mask & ex[:, None]]
            if rows.shape[0] >= 2:
                groups.append(rows)
    return groups


def _task_rows(z, token_mask, onehot, position_wise):
    """A-outputs z [B, T, M, r] of M modules -> the rows of every task with their weights (see the top of the file),
    the M modules as positions: each module's loss is then the average over its positions."""
    B, T, M, r = z.shape
    if position_wise:   # rows: examples; positions: (token, module)
        counts = token_mask[:, :, None].expand(B, T, M).reshape(B, T * M)
        x = _counted(z.reshape(B, T * M, r), counts)
        return x, onehot[:, :, None] & counts[None], onehot, onehot.sum(1) >= 2
    counts = token_mask.reshape(B * T)    # rows: tokens; positions: modules
    member = onehot.repeat_interleave(T, dim=1) & counts[None]           # [G, B·T]
    x = _counted(z.reshape(B * T, M, r), counts[:, None].expand(B * T, M))
    return x, member[:, :, None], member, member.sum(1) >= 2


def alignment_loss(a_outputs, token_mask, task_ids, kind="kl", position_wise=False, pair_reduction="mean",
                   module_reduction="mean", num_tasks=None, **kw):
    """L_align (METHODS §2.10, §3.5): the per-module loss reduced over modules (mean, as the code; or sum).

    a_outputs: dict module name -> A-output [B, T, r] (from `adapter_context(..., collect=True).a_outputs`).
    token_mask [B, T] bool and task_ids [B] as in `task_groups`, whose groups this computes (as weights, without
    host syncs when num_tasks is given). kind "kl" (A-LoRA-K; kw: eps) or "mmd" (A-LoRA-M; kw: sigmas, max_rows).
    Returns an fp32 scalar.
    """
    fns = {"kl": _kl, "mmd": _mmd}
    if kind not in fns:
        raise ValueError(f"alignment kind must be 'kl' or 'mmd', got {kind!r}")
    if module_reduction not in ("mean", "sum"):
        raise ValueError(f"module_reduction must be 'mean' or 'sum', got {module_reduction!r}")
    if pair_reduction not in ("mean", "sum"):
        raise ValueError(f"pair_reduction must be 'mean' or 'sum', got {pair_reduction!r}")
    if not a_outputs:
        raise ValueError("no A-outputs to align: run the forward inside adapter_context(model, collect=True) "
                         "on a model with adapters applied")
    zs = list(a_outputs.values())
    for z in zs:
        _check_batch(z, token_mask, task_ids)
    device = zs[0].device
    token_mask, onehot = token_mask.bool().to(device), _task_onehot(task_ids.to(device), num_tasks)
    if onehot.shape[0] < 2:
        return torch.zeros((), device=device)
    # modules with A-outputs of one shape and dtype go in one go, as positions of one set of rows (a per-module
    # loop is ~100 small ops per module: ~10% of a CPU step for KL); the mean over positions is the mean over them
    parts = [torch.stack(zs, 2)] if len({(z.shape, z.dtype) for z in zs}) == 1 else [z[:, :, None] for z in zs]
    total = sum(fns[kind](_task_rows(z, token_mask, onehot, position_wise), pair_reduction=pair_reduction, **kw)
                * z.shape[2] for z in parts)
    return total / len(zs) if module_reduction == "mean" else total
