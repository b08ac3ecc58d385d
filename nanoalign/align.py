"""Align-LoRA's alignment losses: pull the per-task distributions of LoRA A-outputs together.

Paper: "Align, Don't Divide" (Align-LoRA, arXiv 2508.05078), METHODS.md §2.10 and §3. One plain LoRA is trained with

    L = L_LM + λ · L_align,      L_align = mean over adapted modules m of  reduce_{p<q} D(Z_m[task p], Z_m[task q])

where Z_m = A_m · drop(X_m) ∈ R^{B×T×r} is module m's A-output (METHODS §3.1) and D is

    A-LoRA-K  symmetric KL between per-task diagonal Gaussians   (kl_alignment_loss,  §3.3)
    A-LoRA-M  multi-kernel Gaussian MMD²                         (mmd_alignment_loss, §3.4)

Deliberate deviations from the released code (§3.6, §3.7): explicit task ids per micro-batch; padding (and by default
prompt tokens) masked out; token-level pooling by default (`position_wise=True` keeps the code's per-position
statistics); fp32 throughout; MMD on at most MMD_MAX_ROWS rows per task (its kernel is quadratic in the rows).
The gradient reaches every lora_A, never a module's own lora_B (B acts after the aligned A-output).

λ (§3.5): the code adds λ=0.2 · L_align on the last micro-step only (weight λ/grad_accum relative to the LM loss);
here it is added on every micro-step, so λ_eff = λ/grad_accum emulates the code.
"""

import itertools

import torch

# METHODS §3.4: the released code's 19 bandwidths. σ enters un-squared, exp(-‖u-v‖²/(2σ)), so it acts as a variance.
# Kept in fp32; `sigmas=torch.tensor(MMD_SIGMAS).bfloat16().tolist()` reproduces the code's bf16 rounding.
MMD_SIGMAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0,
              1e3, 1e4, 1e5, 1e6)
MMD_MAX_ROWS = 32  # rows per task MMD compares by default (None: all; the cost grows with their square)


def task_groups(a_output, token_mask, task_ids, num_tasks=None, position_wise=False):
    """Split one module's A-output [B, T, r] into per-task groups, in task-id order (METHODS §3.2, §3.7).

    Token-level: task t's counted tokens [N_t, r]; position_wise: (a_output[t's rows] [n_t, T, r], their mask).
    A task with fewer than 2 rows is skipped: its variance is undefined.
    """
    token_mask, task_ids = token_mask.bool().to(a_output.device), task_ids.to(a_output.device)
    if num_tasks is not None and not ((task_ids >= 0) & (task_ids < num_tasks)).all():
        raise ValueError(f"task_ids must lie in [0, {num_tasks}), got {sorted(set(task_ids.tolist()))}")
    groups = []
    for t in (task_ids.unique().tolist() if num_tasks is None else range(num_tasks)):
        ex = task_ids == t
        if position_wise and ex.sum() >= 2:
            groups.append((a_output[ex], token_mask[ex]))
        elif not position_wise and (token_mask & ex[:, None]).sum() >= 2:
            groups.append(a_output[token_mask & ex[:, None]])
    return groups


def counted(group):
    """A group -> (x [N, S, r], counted [N, S] bool); token rows [N, r] are one position. x in fp32 (fp64 stays),
    zero where not counted: `where`, not a product, so such entries get an exactly zero gradient even if NaN."""
    x, m = group if isinstance(group, (tuple, list)) else (group, None)
    if x.ndim == 2:
        x, m = x[:, None], None if m is None else m[:, None]
    m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if m is None else m.bool()
    return torch.where(m[..., None], x.to(torch.promote_types(x.dtype, torch.float32)), 0.0), m


def all_counted(groups):
    groups = [counted(g) for g in groups]
    if len({x.shape[1:] for x, _ in groups}) > 1:
        raise ValueError(f"all alignment groups need the same positions and rank; got "
                         f"{sorted({tuple(x.shape[1:]) for x, _ in groups})}")
    return groups


def over_pairs(per_pair, pair_reduction, groups):
    """Mean (the code) or sum (the paper) over the task pairs; no pair: a plain zero (safe to add to a loss)."""
    if pair_reduction not in ("mean", "sum"):
        raise ValueError(f"pair_reduction must be 'mean' or 'sum', got {pair_reduction!r}")
    if not per_pair:
        return groups[0][0].new_zeros(()) if groups else torch.zeros(())
    total = torch.stack(per_pair).sum()
    return total / len(per_pair) if pair_reduction == "mean" else total


# ----------------------------------------------------------------------------- KL (A-LoRA-K)

def gaussian(x, m):
    """Per position, over the counted rows: mean μ [S, r], unbiased variance σ² (N-1) [S, r], and the count N [S]."""
    w = m[..., None].to(x.dtype)
    n = w.sum(0)
    mu = (w * x).sum(0) / n.clamp(min=1)
    return mu, (w * (x - mu) ** 2).sum(0) / (n - 1).clamp(min=1), n[:, 0]


def symmetric_kl(mu_p, v_p, mu_q, v_q):
    """D = ½ [KL(p‖q) + KL(q‖p)] of diagonal Gaussians, summed over the last (rank) dim (METHODS §3.3)."""
    kl_pq = 0.5 * (v_q.log() - v_p.log() + v_p / v_q + (mu_q - mu_p) ** 2 / v_q - 1).sum(-1)
    kl_qp = 0.5 * (v_p.log() - v_q.log() + v_q / v_p + (mu_p - mu_q) ** 2 / v_p - 1).sum(-1)
    return 0.5 * (kl_pq + kl_qp)


def kl_alignment_loss(groups, eps=1e-8, pair_reduction="mean"):
    """A-LoRA-K (METHODS §3.3): per task a diagonal Gaussian (μ, σ² + eps), symmetric KL per task pair, averaged over
    the positions where both tasks have ≥ 2 counted rows."""
    groups = all_counted(groups)
    stats = [gaussian(x, m) for x, m in groups]
    per_pair = []
    for (mu_p, var_p, n_p), (mu_q, var_q, n_q) in itertools.combinations(stats, 2):
        ok = (n_p >= 2) & (n_q >= 2)
        if ok.any():
            per_pair.append(symmetric_kl(mu_p[ok], var_p[ok] + eps, mu_q[ok], var_q[ok] + eps).mean())
    return over_pairs(per_pair, pair_reduction, groups)


# ----------------------------------------------------------------------------- MMD (A-LoRA-M)

def kernel_mean(x, mx, y, my, sigmas):
    """Per position, the mean over counted row pairs (u of x, v of y) of k(u, v) = Σ_σ exp(−‖u − v‖² / (2σ))."""
    sigmas = torch.tensor(sigmas, dtype=x.dtype, device=x.device)
    d = ((x[:, None] - y[None]) ** 2).sum(-1)           # [N, M, S]; exact differences: σ goes down to 1e-6
    k = torch.exp(-d[..., None] / (2 * sigmas)).sum(-1)
    w = (mx[:, None] & my[None]).to(x.dtype)
    return (w * k).sum((0, 1)) / w.sum((0, 1)).clamp(min=1)


def evenly_spaced(n, m):
    return torch.arange(n) if m is None or n <= m else torch.linspace(0, n - 1, m).round().long()


def mmd_alignment_loss(groups, sigmas=None, max_rows=MMD_MAX_ROWS, pair_reduction="mean"):
    """A-LoRA-M (METHODS §3.4): MMD²(p, q) = mean k(x_p, x_p) + mean k(x_q, x_q) − 2 mean k(x_p, x_q), the biased
    V-statistic, on `max_rows` evenly spaced rows per group (deterministic; None: all)."""
    groups = [(x[i], m[i]) for x, m in all_counted(groups) for i in [evenly_spaced(len(x), max_rows).to(x.device)]]
    sig = MMD_SIGMAS if sigmas is None else sigmas
    per_pair = []
    for (xp, mp), (xq, mq) in itertools.combinations(groups, 2):
        ok = mp.any(0) & mq.any(0)
        if ok.any():
            mmd2 = (kernel_mean(xp, mp, xp, mp, sig) + kernel_mean(xq, mq, xq, mq, sig)
                    - 2 * kernel_mean(xp, mp, xq, mq, sig))
            per_pair.append(mmd2[ok].mean())
    return over_pairs(per_pair, pair_reduction, groups)


def alignment_loss(a_outputs, token_mask, task_ids, kind="kl", position_wise=False, pair_reduction="mean",
                   module_reduction="mean", num_tasks=None, **kw):
    """L_align (METHODS §2.10, §3.5) of {module name: A-output [B, T, r]}: mean (the code) or sum over modules."""
    loss = {"kl": kl_alignment_loss, "mmd": mmd_alignment_loss}[kind]
    per_module = [loss(task_groups(z, token_mask, task_ids, num_tasks, position_wise), pair_reduction=pair_reduction,
                       **kw) for z in a_outputs.values()]
    return sum(per_module) / len(per_module) if module_reduction == "mean" else sum(per_module)
