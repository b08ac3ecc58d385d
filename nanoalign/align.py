"""Align-LoRA's alignment losses: pull the per-task distributions of LoRA A-outputs together.

Paper: "Align, Don't Divide" (Align-LoRA, arXiv 2508.05078), METHODS.md §2.10 and §3. One plain LoRA is trained
on a task mixture with

    L = L_LM + λ · L_align,      L_align = mean over adapted modules m of  reduce_{p<q} D(Z_m[task p], Z_m[task q])

where Z_m = A_m · drop(X_m) ∈ R^{B×T×r} is module m's A-output (the down-projection, METHODS §3.1) and D is

    A-LoRA-K  symmetric KL between per-task diagonal Gaussians   (kl_alignment_loss,  §3.3)
    A-LoRA-M  multi-kernel Gaussian MMD²                         (mmd_alignment_loss, §3.4)

        Z_m [B, T, r] ──task_groups──▶ [rows of task 0], [rows of task 1], ...  ──D over pairs──▶ scalar
              (token_mask, task_ids)      token-level [N_t, r]  or  position-wise ([N_t, T, r], mask)

Deviations from the released code (METHODS §3.6), on purpose:
  * computed per micro-batch from explicit task ids (the caller's task-balanced batches), not pooled over the
    accumulation window and regrouped by position (the released sampler is never used and the split is wrong:
    §3.6 items 1-2);
  * padding and, by default, prompt tokens are masked out (the code includes padding), and the default pooling is
    token-level (μ_t, σ²_t ∈ R^r over all counted tokens of task t); `position_wise=True` keeps the code's per-position
    statistics, with masked positions excluded from them (pass an all-True mask to include padding as the code does);
  * fp32 throughout (the code runs KL/MMD in bf16 and stores the MMD bandwidths in bf16), autocast disabled inside;
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
from torch.utils.checkpoint import checkpoint

# METHODS §3.4: the released code's 19 bandwidths. σ enters un-squared, exp(-‖u-v‖²/(2σ)), so it acts as a variance.
# Kept in fp32 (the code stores them in bf16, which rounds e.g. 0.1 -> 0.10009765625 and 1e4 -> 9984); pass
# `sigmas=torch.tensor(MMD_SIGMAS).bfloat16().tolist()` to reproduce that rounding.
MMD_SIGMAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
              1e3, 1e4, 1e5, 1e6)


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
        x = x.to(torch.promote_types(x.dtype, torch.float32))          # bf16/fp16 -> fp32; fp64 stays (gradcheck)
        # where, not multiply: a masked entry contributes nothing and gets an exactly zero gradient
        out.append((torch.where(m[..., None], x, 0.0), m))
    if len({x.shape[1:] for x, _ in out}) > 1:
        raise ValueError(f"all alignment groups need the same positions and rank; got "
                         f"{sorted({tuple(x.shape[1:]) for x, _ in out})}")
    return out


def _reduce_pairs(D, valid, pair_reduction):
    """D, valid: [P, S] per unordered task pair and position -> scalar.

    Each pair averages D over the positions valid for both tasks; pairs with no valid position are dropped; then
    mean (the code) or sum (the paper) over the remaining pairs.
    """
    n = valid.sum(-1)
    per_pair = torch.where(valid, D, 0.0).sum(-1) / n.clamp(min=1)
    keep = n > 0
    if not bool(keep.any()):
        return D.new_zeros(())
    return per_pair[keep].mean() if pair_reduction == "mean" else per_pair[keep].sum()


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
    if zero is not None:
        return zero
    gs = _masked_groups(groups)
    with _no_autocast(gs[0][0]):
        mus, vars_, valid = [], [], []
        for x, m in gs:
            w = m.float()[..., None]                                     # [N, S, 1]
            n = w.sum(0)                                                 # [S, 1]
            mu = (w * x).sum(0) / n.clamp(min=1)
            var = (w * (x - mu) ** 2).sum(0) / (n - 1).clamp(min=1)
            ok = n[:, 0] >= 2
            # invalid positions get harmless stand-ins: their D is discarded, and finite values keep the
            # gradient finite too (a NaN in a discarded branch of `where` still poisons the backward)
            mus.append(torch.where(ok[:, None], mu, 0.0))
            vars_.append(torch.where(ok[:, None], var, 1.0))
            valid.append(ok)
        p, q = torch.triu_indices(len(gs), len(gs), 1, device=gs[0][0].device)   # unordered pairs p < q
        mu, v, valid = torch.stack(mus), torch.stack(vars_) + eps, torch.stack(valid)   # [G, S, r], [G, S]
        mp, mq, vp, vq = mu[p], mu[q], v[p], v[q]                                       # [P, S, r]
        kl_pq = 0.5 * (vq.log() - vp.log() + vp / vq + (mq - mp) ** 2 / vq - 1).sum(-1)  # KL(p‖q) [P, S]
        kl_qp = 0.5 * (vp.log() - vq.log() + vq / vp + (mp - mq) ** 2 / vp - 1).sum(-1)  # KL(q‖p)
        return _reduce_pairs(0.5 * (kl_pq + kl_qp), valid[p] & valid[q], pair_reduction)


def _subsample(x, m, max_rows):
    """Deterministic, evenly spaced rows (no RNG state touched) when there are more than max_rows."""
    if max_rows is None or x.shape[0] <= max_rows:
        return x, m
    idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).round().long()
    return x[idx], m[idx]


def _kernel_mean(x, mx, y, my, sigmas):
    """Per position s: mean over unmasked (n, m) of Σ_σ exp(−‖x[n,s] − y[m,s]‖² / (2σ)) -> [S]."""
    # exact differences (not the |x|²+|y|²−2xy expansion): with σ down to 1e-6 the round-off of the expansion
    # (~1e-7·|x|²) would turn exp(−0/2σ)=1 into ~0.6 on the diagonal
    d = torch.cdist(x.transpose(0, 1), y.transpose(0, 1), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    k = sum(torch.exp(d / (-2.0 * s)) for s in sigmas)                   # [S, Nx, Ny]
    w = (mx.t()[:, :, None] & my.t()[:, None, :]).float()               # [S, Nx, Ny] pairs that count
    return (k * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)


def mmd_alignment_loss(groups, sigmas=None, max_rows=None, pair_reduction="mean"):
    """A-LoRA-M (METHODS §3.4): multi-kernel Gaussian MMD² between task groups, reduced over task pairs.

        k(u, v) = Σ_σ exp(−‖u − v‖² / (2σ))     σ ∈ MMD_SIGMAS (19 values, σ UN-squared: it acts as a variance)
        MMD²(p, q) = mean k(x_p, x_p) + mean k(x_q, x_q) − 2 mean k(x_p, x_q)

    Biased V-statistic (all row pairs, diagonal included), ‖·‖² over the r dims. Position-wise groups compare rows
    at the same position only and average MMD² over positions where both tasks have ≥1 unmasked row. Mean (code)
    or sum (paper) over unordered task pairs. fp32, bandwidths in fp32 (the code: bf16). Fewer than 2 groups: zero.

    Memory: a kernel matrix is N_p × N_q per position and the 19 exponentials would all be kept for the backward;
    with thousands of token rows and ~100 modules that is far too much, so each kernel mean is checkpointed (only
    the rows are kept; the kernel is recomputed in the backward, one at a time). `max_rows` keeps that many evenly
    spaced rows per task (deterministic) to bound the compute as well; None keeps all rows.
    """
    sigmas = MMD_SIGMAS if sigmas is None else tuple(float(s) for s in sigmas)
    zero = _check_and_zero(groups, pair_reduction)
    if zero is not None:
        return zero
    gs = [_subsample(x, m, max_rows) for x, m in _masked_groups(groups)]
    with _no_autocast(gs[0][0]):

        def kernel_mean(i, j):
            (x, mx), (y, my) = gs[i], gs[j]
            if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
                return checkpoint(_kernel_mean, x, mx, y, my, sigmas, use_reentrant=False)
            return _kernel_mean(x, mx, y, my, sigmas)

        G = len(gs)
        k_self = [kernel_mean(i, i) for i in range(G)]                   # [S] each, once per task
        pairs = [(i, j) for i in range(G) for j in range(i + 1, G)]
        D = torch.stack([k_self[i] + k_self[j] - 2 * kernel_mean(i, j) for i, j in pairs])     # [P, S]
        present = [m.any(0) for _, m in gs]                              # ≥1 row of the task at that position
        valid = torch.stack([present[i] & present[j] for i, j in pairs])
        return _reduce_pairs(D, valid, pair_reduction)


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
    """
    if a_output.ndim != 3:
        raise ValueError(f"a_output must be [B, T, r], got shape {tuple(a_output.shape)}")
    B, T, _ = a_output.shape
    if token_mask.shape != (B, T):
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, expected {(B, T)} like the A-output")
    if task_ids.shape != (B,):
        raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}, expected ({B},): one task id per example")
    token_mask = token_mask.bool().to(a_output.device)
    task_ids = task_ids.to(a_output.device)
    if num_tasks is None:
        tasks = task_ids.unique().tolist()
    else:
        if bool(((task_ids < 0) | (task_ids >= num_tasks)).any()):
            raise ValueError(f"task_ids must lie in [0, {num_tasks}), got {sorted(set(task_ids.tolist()))}")
        tasks = range(num_tasks)
    groups = []
    for t in tasks:
        ex = task_ids == t
        if position_wise:
            if int(ex.sum()) >= 2:
                groups.append((a_output[ex], token_mask[ex]))
        else:
            rows = a_output[token_mask & ex[:, None]]
            if rows.shape[0] >= 2:
                groups.append(rows)
    return groups


def alignment_loss(a_outputs, token_mask, task_ids, kind="kl", position_wise=False, pair_reduction="mean",
                   module_reduction="mean", num_tasks=None, **kw):
    """L_align (METHODS §2.10, §3.5): the per-module loss reduced over modules (mean, as the code; or sum).

    a_outputs: dict module name -> A-output [B, T, r] (from `adapter_context(..., collect=True).a_outputs`).
    kind "kl" (A-LoRA-K; kw: eps) or "mmd" (A-LoRA-M; kw: sigmas, max_rows). Returns an fp32 scalar.
    """
    fns = {"kl": kl_alignment_loss, "mmd": mmd_alignment_loss}
    if kind not in fns:
        raise ValueError(f"alignment kind must be 'kl' or 'mmd', got {kind!r}")
    if module_reduction not in ("mean", "sum"):
        raise ValueError(f"module_reduction must be 'mean' or 'sum', got {module_reduction!r}")
    if not a_outputs:
        raise ValueError("no A-outputs to align: run the forward inside adapter_context(model, collect=True) "
                         "on a model with adapters applied")
    zs = list(a_outputs.values())
    same = zs[0].ndim == 3 and len({(z.shape, z.dtype) for z in zs}) == 1
    rows = int(token_mask.sum()) if kind == "mmd" else 0
    if not position_wise and same and len(zs) * rows ** 2 <= 2 ** 26:
        # all modules in one go (a per-module loop is ~100 small ops per module: ~10% of a CPU step for KL, 4x the
        # step for MMD): task t's token rows of every module form [N_t, M, r], which the losses read as a
        # position-wise group whose M "positions" are the modules; the average over positions is then the mean over
        # modules. MMD keeps an [M, N_p, N_q] kernel, so only for small row counts (else the loop below).
        z = torch.stack(zs, 2)                                                  # [B, T, M, r]
        groups = [g.view(g.shape[0], len(zs), -1)
                  for g in task_groups(z.flatten(2), token_mask, task_ids, num_tasks)]
        loss = fns[kind](groups, pair_reduction=pair_reduction, **kw)
        return loss if module_reduction == "mean" else loss * len(zs)
    total = torch.zeros((), device=zs[0].device)
    for z in zs:
        groups = task_groups(z, token_mask, task_ids, num_tasks, position_wise)
        total = total + fns[kind](groups, pair_reduction=pair_reduction, **kw).to(total.device)
    return total / len(a_outputs) if module_reduction == "mean" else total
