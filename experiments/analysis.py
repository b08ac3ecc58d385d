"""What the trained adapters look like: inter-head similarity and ΔW spectra (METHODS.md §4.1), and how far apart
the tasks sit in A-output space (§4.2).
"""

import math
import re

import torch

from nanoalign.adapters import adapter_context, adapter_modules


def layer_index(name: str):
    """`model.layers.3.mlp.up_proj` -> 3 (None when the path has no `layers.<i>`)."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def head_cosine_similarity(model) -> dict:
    """{(layer, module type): mean pairwise cosine of the flattened heads B_i} (METHODS §4.1, Align-LoRA Fig. 2);
    NaN where a head is zero. High values: the heads learned the same thing (the "multi-head paradox")."""
    out = {}
    for name, m in adapter_modules(model):
        if getattr(m, "heads", 1) < 2:
            continue
        flat = m.lora_B.weight.detach().float().flatten(1)  # [N, out·r]
        norms = flat.norm(dim=1)
        u = flat / norms[:, None]
        i, j = torch.triu_indices(len(u), len(u), offset=1)
        key = (layer_index(name), name.rsplit(".", 1)[-1])
        out[key] = math.nan if bool((norms == 0).any()) else (u @ u.T)[i, j].mean().item()
    return out


def lowrank(m, task=None):
    """m.lowrank(task) = (B, A, s), ΔW = s·B A; for a router adapter the ΔW a uniform router gives (ω_i = 1/N)."""
    return m.lowrank(task, uniform_router=True) if hasattr(m, "lora_router") else m.lowrank(task)


@torch.no_grad()
def delta_weight_spectrum(model, task=None) -> dict:
    """{module path: singular values of ΔW = B A}, from a k×k matrix (QR of both rank-k factors); router adapters
    at a uniform router, MTL-LoRA for `task`."""
    out = {}
    for name, m in adapter_modules(model):
        B, A, s = lowrank(m, task)
        _, rb = torch.linalg.qr((s * B).float())  # B = Q_B R_B
        _, ra = torch.linalg.qr(A.float().T)    # Aᵀ = Q_A R_A
        out[name] = torch.linalg.svdvals(rb @ ra.T).cpu()  # ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ: same singular values
    return out


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank exp(−Σ p_i log p_i), p = s / Σ s (Roy & Vetterli, 2007); 0 for ΔW = 0."""
    s = s.double().clamp(min=0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


# ----------------------------------------------------------------------------- task clusters of A-outputs (§4.2)

@torch.no_grad()
def collect_a_outputs(model, input_ids, attention_mask, task_ids=None) -> dict:
    """{module path: [B, T, r] the module's A-output A·x} from one eval-mode forward (no dropout, no lm_head): the
    tensor Align-LoRA aligns (METHODS §3.1), collected through `adapter_context(collect=True)`, not hooks."""
    was_training = model.training
    model.eval()
    try:
        with adapter_context(model, task_ids=task_ids, collect=True) as ctx:
            model(input_ids, attention_mask, logits_at=torch.zeros_like(attention_mask))
    finally:
        model.train(was_training)
    return ctx.a_outputs


def pool_a_outputs(a_outputs: dict, attention_mask) -> dict:
    """{module: [B, T, r]} -> {module: [B, r]}: each example's mean A-output over its real (mask True) tokens."""
    w = attention_mask.float()[..., None]
    return {name: ((z.float() * w).sum(1) / w.sum(1).clamp(min=1)) for name, z in a_outputs.items()}


def task_separation(features: torch.Tensor, task_ids: torch.Tensor) -> dict:
    """Mean distance between task means over the RMS distance of a row to its task's mean: alignment should shrink
    `ratio` without collapsing `within` (METHODS §4.2: "closer but not collapsed")."""
    x = features.double()
    tasks = sorted(set(task_ids.tolist()))
    if len(tasks) < 2:
        raise ValueError(f"task_separation needs rows of at least 2 tasks, got {len(tasks)}")
    mus = torch.stack([x[task_ids == t].mean(0) for t in tasks])
    within = torch.stack([((x[task_ids == t] - mus[i]) ** 2).sum(-1).mean() for i, t in enumerate(tasks)]).mean()
    i, j = torch.triu_indices(len(tasks), len(tasks), offset=1)
    between = (mus[i] - mus[j]).norm(dim=-1).mean()
    within = within.sqrt()
    return {"between": between.item(), "within": within.item(),
            "ratio": (between / within).item() if within > 0 else math.inf}


@torch.no_grad()
def separation_probe(model, tok, tasks: dict, n=16, max_len=128) -> dict:
    """Task separation in A-output space (METHODS §3.1) on the first n examples per task: `task_separation` of the
    token-mean A-outputs averaged over modules, and the held-out KL alignment loss."""
    from nanoalign.align import alignment_loss
    from nanoalign.data import encode_example, pad_right
    names = sorted(tasks)
    rows = [(encode_example(tok, ex, max_len), i) for i, t in enumerate(names) for ex in tasks[t][:n]]
    ids, mask, _ = pad_right([r[0][0] for r in rows], [r[0][1] for r in rows], tok.pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    task_ids = torch.tensor([r[1] for r in rows], device=device)
    a_outputs = collect_a_outputs(model, ids, mask, task_ids)
    seps = [task_separation(f, task_ids) for f in pool_a_outputs(a_outputs, mask).values()]
    kl = alignment_loss(a_outputs, mask, task_ids, kind="kl").item()
    mean = lambda key: sum(s[key] for s in seps) / len(seps)  # noqa: E731
    return {"sep_ratio": mean("ratio"), "sep_between": mean("between"), "sep_within": mean("within"),
            "heldout_kl": kl, "n": n}
