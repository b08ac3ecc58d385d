"""LoRA and its multi-task relatives as drop-in replacements for `nn.Linear` (METHODS.md §2.1–2.8, §2.10).

Every adapter keeps the frozen base `weight`/`bias` as its own parameters (so `...mlp.up_proj.weight` is still the
key a base checkpoint loads into) and adds low-rank parts named like PEFT's (`lora_A.weight` [r, in],
`lora_B.weight` [out, r]; multi-head: [N, out, r]):

            x ──────────────────── W0 (frozen) ───────────────────┐
            │                                                      + ── h
            └─ drop ─ A [r×in] ─ z ─┬─ B_1 [out×r] ─ ω_1 ─┐        │
                                    ├─ ...                ├─ Σ · s ┘
                                    └─ B_N [out×r] ─ ω_N ─┘

    lora / align     h = W0 x + b + s·B A drop(x)                                  §2.1, §2.2, §2.10
    hydra            h = W0 x + b + s·Σ_i ω_i(x) B_i A drop(x),  ω = softmax(W_r x)  §2.3
    hydra-norouter   h = W0 x + b + s·Σ_i c B_i A drop(x),   c = 1 (sum) or 1/N      §2.4
    rlora            h = W0 x + b − C x + s·Σ_i ω_i(x) B_i drop_i(A x)             §2.5 (random init, C = compensation)
    mlora            h = W0 x + b − C x + s·Σ_i c B_i drop_i(A x)                  §2.6
    mtl              h = W0 x + b + s·(Σ_j softmax(w_t/τ)_j B_j) Λ_t A drop(x)      §2.7 (t = the sample's task)
    multilora        h = W0 x + b + s·Σ_i diag(g_i) B_i A_i drop(x)                §2.8

Each row is one class below whose `forward` is that equation; Σ_i B_i u_i is one matmul (`sum_heads`). `lowrank()`
gives ΔW = s·B A for merging and PEFT export, or a ValueError saying why there is no fixed ΔW.

R-LoRA's code edits W0 ← W0 − C once at init. We keep W0 and subtract C x in the forward, C held as two frozen
rank-r buffers: the same function, but the base checkpoint stays valid and the saved adapter carries C.

Task ids in, A-outputs (the tensor Align-LoRA aligns, METHODS §3.1) out, through `adapter_context`, not hooks.
"""

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUTED = "its router makes ΔW depend on the input x; it needs the unmerged heads"


# ----------------------------------------------------------------------------- context (task ids in, A-outputs out)

@dataclass
class AdapterContext:
    task_ids: torch.Tensor | None = None   # LongTensor [B]: the task of each sample (MTL-LoRA needs it)
    collect: bool = False                  # store each adapter's A-output in `a_outputs`
    a_outputs: dict = field(default_factory=dict)  # module name -> A-output [B, T, r], with grad

    def put(self, name, z):
        """Store module `name`'s A-output; a call without grad never replaces an entry that has grad."""
        if torch.is_grad_enabled() or name not in self.a_outputs:
            self.a_outputs[name] = z


@contextmanager
def adapter_context(model, task_ids=None, collect=False):
    """Share one AdapterContext with every module of `model` that has an `adapter_ctx`. With gradient checkpointing
    the backward re-runs the forward, which needs the task ids again: call `.backward()` inside the block."""
    hosts = [m for m in model.modules() if hasattr(m, "adapter_ctx")]
    if task_ids is not None:
        if not torch.is_tensor(task_ids) or task_ids.dim() != 1 or task_ids.is_floating_point():
            raise ValueError("task_ids must be an integer tensor of shape [batch] (one task id per sample)")
        n = (getattr(model, "adapter_config", None) or {}).get("num_tasks")
        # checked where it is free: reading GPU ids would stop the host until the GPU has caught up
        if n is not None and task_ids.device.type == "cpu" and task_ids.numel() and \
                not (0 <= int(task_ids.min()) and int(task_ids.max()) < n):
            raise ValueError(f"task ids must lie in [0, {n}) (the adapter was built with num_tasks={n}), "
                             f"got {task_ids.min().item()}..{task_ids.max().item()}")
    ctx, previous = AdapterContext(task_ids=task_ids, collect=collect), [m.adapter_ctx for m in hosts]
    for m in hosts:
        m.adapter_ctx = ctx
    try:
        yield ctx
    finally:
        for m, p in zip(hosts, previous):
            m.adapter_ctx = p


# ----------------------------------------------------------------------------- the shared base

class Weight(nn.Module):
    """A bare parameter holder, so state_dict keys read `lora_A.weight` like PEFT's. Adapter tensors are fp32."""

    def __init__(self, *shape, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))


def kaiming_(t):
    """PEFT/nn.Linear's default init, kaiming-uniform(a=√5) = U(−1/√fan_in, 1/√fan_in), for each trailing matrix."""
    with torch.no_grad():
        for m in t.view(-1, *t.shape[-2:]):
            nn.init.kaiming_uniform_(m, a=math.sqrt(5))
    return t


class AdapterLinear(nn.Module):
    """Frozen base linear + adapter. `mergeable`: the eval-mode ΔW is one fixed matrix. `lowrank(task)` -> (B, A, s)
    with ΔW = s·B A in fp32 (LoRA keeps its own s, which PEFT takes 1:1; the others fold s into B)."""
    mergeable = True
    needs_task_ids = False

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0, rank_stabilized=False):
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"adapter rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: same state_dict keys as nn.Linear
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.rank_stabilized = int(rank), alpha, rank_stabilized
        self.scaling = alpha / math.sqrt(rank) if rank_stabilized else alpha / rank  # s (rsLoRA: α/√r)
        self.dropout_p = dropout
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_ctx: AdapterContext | None = None
        self.adapter_name = ""  # full module path, set by apply_adapter; keys of ctx.a_outputs and saved tensors

    def new(self, *shape):
        return Weight(*shape, device=self.weight.device)

    def frozen(self, x):
        """(W0 x + b, x for the adapter): fp32 adapter weights on a bf16 base, unless autocast picks the dtype."""
        h = F.linear(x, self.weight, self.bias)
        return h, x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)

    def add(self, h, delta, z, a_outputs):
        """h + delta, after handing the A-output z to the alignment loss (METHODS §3.1): into the block's `a_outputs`
        (returned, so a checkpointed block has no side effects), else into a collecting context."""
        if a_outputs is not None:
            a_outputs[self.adapter_name] = z
        elif self.adapter_ctx is not None and self.adapter_ctx.collect:
            self.adapter_ctx.put(self.adapter_name, z)
        return h + delta.to(h.dtype)

    def delta_weight(self, task=None):
        """Dense eval-mode ΔW [out, in] in fp32 (compensation included), so that h = (W0 + ΔW) x + b."""
        B, A, s = self.lowrank(task)
        return (s * B) @ A

    @torch.no_grad()
    def merge(self, task=None) -> nn.Linear:
        """A plain nn.Linear with W0 + ΔW (ΔW_t with `task`): the same eval-mode function, without the adapter."""
        try:
            delta = self.delta_weight(task)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__} cannot be merged: {e}") from None
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter((self.weight.float() + delta.to(self.weight.device)).to(self.weight.dtype),
                                  requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, s={self.scaling:.4g}"


def no_task(task):
    """lowrank's refusal of task= where ΔW is the same for every task."""
    if task is not None:
        raise ValueError("task= is only for adapters whose ΔW depends on the task (mtl); this one has one ΔW, "
                         "drop task=")


# ----------------------------------------------------------------------------- pieces the multi-head adapters share

def sum_heads(u, B, v=None, C=None):
    """Σ_i B_i u_i as one matmul [B_1 | … | B_N]·[u_1; …; u_N]: u [..., N, r], B [N, out, r] -> [..., out].
    (v, C): one more term C v in the same matmul (R-LoRA / M-LoRA's −C x = (−comp_B)(comp_A x))."""
    u, W = u.flatten(-2), B.permute(1, 0, 2).reshape(B.shape[1], -1)
    if v is not None:
        u, W = torch.cat([u, v], -1), torch.cat([W, C], 1)
    return F.linear(u, W)


def drop_heads(z, n, p, training):
    """drop_i(z) for i = 1..n: [..., r] -> [..., n, r], an independent dropout mask per head (R-LoRA, M-LoRA)."""
    if not (training and p > 0):
        return z.unsqueeze(-2)  # no mask: every head sees the same z
    return F.dropout(z.unsqueeze(-2).expand(*z.shape[:-1], n, z.shape[-1]), p, training)


class RouterLogits(torch.autograd.Function):
    """Router logits x W_rᵀ in fp32 (METHODS §2.3) = F.linear(x.float(), W_r), but keeping x in its own dtype for the
    backward: autograd would keep the fp32 copy of x, on a bf16 base a second copy of every routed layer's input."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            gx = (g @ w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            gw = (g.flatten(0, -2).t() @ x.flatten(0, -2).float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def route(x, w):
    """ω(x) = softmax(W_r x) [..., N] on the un-dropped x, in fp32 even under autocast (a bf16 softmax is coarse)."""
    with torch.autocast(x.device.type, enabled=False):
        logits = RouterLogits.apply(x, w)
    return logits.softmax(-1).to(x.dtype)


def hydra_init_(m, heads, head_reduction="sum"):
    """HydraLoRA's parts and init: A [r, in] kaiming-uniform, N heads B_i [out, r] at zero (options checked)."""
    if int(heads) < 1:
        raise ValueError(f"heads must be a positive integer, got {heads}")
    if head_reduction not in ("sum", "mean"):
        raise ValueError(f"head_reduction must be 'sum' or 'mean', got {head_reduction!r}")
    m.heads, m.head_reduction = int(heads), head_reduction
    m.lora_A = m.new(m.rank, m.in_features)
    m.lora_B = m.new(m.heads, m.out_features, m.rank)
    kaiming_(m.lora_A.weight)


def head_weights(m, reduction):
    """c [N]: 1 per head for heads summed ("sum"), 1/N for heads averaged or a uniform router ("mean")."""
    return torch.full((m.heads,), 1.0 if reduction == "sum" else 1.0 / m.heads, device=m.lora_A.weight.device)


def random_init_(m, gamma, code_faithful):
    """R-LoRA's init (METHODS §2.5): A ~ N(0, 1/max(r, in)), B_i ~ N(0, 1/max(out, r)), times out^¼/√γ (paper);
    code_faithful: r^¼/√γ inside the released code's per-head loop, so A gets it N times and head i N−i times."""
    A, B, N = m.lora_A.weight, m.lora_B.weight, m.heads
    with torch.no_grad():
        nn.init.normal_(A, std=1 / math.sqrt(max(m.rank, m.in_features)))
        nn.init.normal_(B, std=1 / math.sqrt(max(m.out_features, m.rank)))
        if code_faithful:
            f = m.rank ** 0.25 / math.sqrt(gamma)
            A.mul_(f ** N)
            B.mul_((f ** torch.arange(N, 0, -1, dtype=torch.float64)).to(B)[:, None, None])
        else:
            f = m.out_features ** 0.25 / math.sqrt(gamma)
            A.mul_(f)
            B.mul_(f)


def compensate_(m, c):
    """The frozen compensation C = s·Σ_i c_i B_i⁰ A⁰ as buffers comp_B [out, r], comp_A [r, in] (module docstring)."""
    with torch.no_grad():
        B, A, _ = heads_lowrank(m, c)
    # detach: a clone of lora_A keeping its graph would make the "frozen" C send gradient into A
    m.register_buffer("comp_A", A.detach().clone())
    m.register_buffer("comp_B", B.detach().clone())


def heads_lowrank(m, c):
    """ΔW of fixed head weights c [N] with s folded in: (s·Σ_i c_i B_i, A, 1); with R-LoRA / M-LoRA's compensation
    C, the exact rank-2r form ([s·Σ_i c_i B_i | −C_B], [A; C_A], 1)."""
    B, A = m.scaling * torch.einsum("n,nor->or", c, m.lora_B.weight.float()), m.lora_A.weight.float()
    if hasattr(m, "comp_A"):
        B, A = torch.cat([B, -m.comp_B.float()], 1), torch.cat([A, m.comp_A.float()])
    return B, A, 1.0


# ----------------------------------------------------------------------------- the adapters

class LoRALinear(AdapterLinear):
    """LoRA (METHODS §2.1): h = W0 x + b + s·B A drop(x), A kaiming-uniform, B = 0, s = α/r. Also high-rank LoRA
    (§2.2, `rank_for_budget`) and Align-LoRA (§2.10: align.py aligns the A-output A·drop(x))."""

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, rank_stabilized=False):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        self.lora_A = self.new(self.rank, self.in_features)
        self.lora_B = self.new(self.out_features, self.rank)  # zeros: ΔW = 0 at step 0
        kaiming_(self.lora_A.weight)

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        z = F.linear(self.lora_dropout(x), self.lora_A.weight)                          # A drop(x): the A-output
        return self.add(h, F.linear(z, self.scaling * self.lora_B.weight), z, a_outputs)  # s on the small weight

    def lowrank(self, task=None):
        no_task(task)  # A and B as they are, at the adapter's own scale: PEFT takes them 1:1 with its α
        return self.lora_B.weight.float(), self.lora_A.weight.float(), self.scaling


class HydraLoRALinear(AdapterLinear):
    """HydraLoRA (METHODS §2.3): shared A, N zero-init heads B_i, a dense softmax router W_r [N, in] (no bias).

        h = W0 x + b + s·Σ_i ω_i(x) B_i A drop(x),   ω(x) = softmax(W_r x) in fp32 on the un-dropped x

    One dropout mask on x, shared by the heads. A-output: A·drop(x). Not mergeable: ω depends on x.
    """
    mergeable = False

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, rank_stabilized=False):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        hydra_init_(self, heads)
        self.lora_router = self.new(self.heads, self.in_features)
        kaiming_(self.lora_router.weight)

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        z = F.linear(self.lora_dropout(x), self.lora_A.weight)                      # A drop(x), shared by the heads
        u = z.unsqueeze(-2) * route(x, self.lora_router.weight).unsqueeze(-1)       # [..., N, r]: ω_i(x) z
        return self.add(h, sum_heads(u, self.scaling * self.lora_B.weight), z, a_outputs)

    def lowrank(self, task=None, uniform_router=False):
        """Refused (ω depends on x); uniform_router=True: the ΔW of ω_i = 1/N, the analyses' convention."""
        no_task(task)
        if not uniform_router:
            raise ValueError(ROUTED)
        return heads_lowrank(self, head_weights(self, "mean"))


class HydraNoRouterLinear(AdapterLinear):
    """HydraLoRA without router (METHODS §2.4), the ablation of Align-LoRA Table 1:

        h = W0 x + b + s·Σ_i c B_i A drop(x),   c = 1 (head_reduction="sum") or 1/N ("mean")

    Every head gets the same gradient and, starting from 0, stays equal to the others: a rank-r LoRA in disguise.
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, head_reduction="sum", rank_stabilized=False):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        hydra_init_(self, heads, head_reduction)

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        z = F.linear(self.lora_dropout(x), self.lora_A.weight)
        # the same z for every head: Σ_i c B_i z = (Σ_i c B_i) z, an r-wide matmul instead of an N·r-wide one
        B = self.scaling * (head_weights(self, self.head_reduction)[:, None, None] * self.lora_B.weight).sum(0)
        return self.add(h, F.linear(z, B), z, a_outputs)

    def lowrank(self, task=None):
        no_task(task)
        return heads_lowrank(self, head_weights(self, self.head_reduction))


class RLoRALinear(AdapterLinear):
    """R-LoRA (METHODS §2.5): HydraLoRA with multi-head dropout and random init, s = α/√r.

        h = W0 x + b − C x + s·Σ_i ω_i(x) B_i drop_i(A x),   C = s·(1/N)Σ_i B_i⁰ A⁰

    C cancels the initial output only for a uniform router, as in the original. The ablation flags (METHODS §6.1
    Table 4): multi_head_dropout=False is "+Init", random_init=False (C = 0) "+MT".
    """
    mergeable = False

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, gamma=64.0, code_faithful=False,
                 rank_stabilized=True, multi_head_dropout=True, random_init=True):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        hydra_init_(self, heads)
        self.lora_router = self.new(self.heads, self.in_features)
        kaiming_(self.lora_router.weight)
        self.multi_head_dropout = bool(multi_head_dropout)
        if self.multi_head_dropout:
            self.lora_dropout = nn.Identity()  # the dropout sits after A, one mask per head
        if random_init:
            random_init_(self, gamma, code_faithful)
        compensate_(self, head_weights(self, "mean"))

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        if self.multi_head_dropout:  # z = A x, then an independent mask per head
            z = F.linear(x, self.lora_A.weight)
            u = drop_heads(z, self.heads, self.dropout_p, self.training)
        else:                        # "+Init": HydraLoRA's one mask on x, before A
            z = F.linear(self.lora_dropout(x), self.lora_A.weight)
            u = z.unsqueeze(-2)
        u = u * route(x, self.lora_router.weight).unsqueeze(-1)                     # [..., N, r]: ω_i(x) drop_i(z)
        delta = sum_heads(u, self.scaling * self.lora_B.weight, F.linear(x, self.comp_A), -self.comp_B)
        return self.add(h, delta, z, a_outputs)

    def lowrank(self, task=None, uniform_router=False):
        """Refused (ω depends on x); uniform_router=True: the ΔW of ω_i = 1/N, the analyses' convention."""
        no_task(task)
        if not uniform_router:
            raise ValueError(ROUTED)
        return heads_lowrank(self, head_weights(self, "mean"))


class MLoRALinear(AdapterLinear):
    """M-LoRA (METHODS §2.6): R-LoRA without the router, heads summed (head_reduction="sum", default) or averaged.

        h = W0 x + b − C x + s·Σ_i c B_i drop_i(A x),   C = s·Σ_i c B_i⁰ A⁰ (exact: the initial function is the base's)

    Mergeable: in eval mode ΔW = s·(Σ_i c B_i) A − C, rank ≤ 2r. The paper's sum-vs-mean choice is unknown.
    """
    multi_head_dropout = True

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, head_reduction="sum", gamma=64.0,
                 code_faithful=False, rank_stabilized=True):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        hydra_init_(self, heads, head_reduction)  # its A is redrawn below; drawn anyway, so a seed gives what it gave
        self.lora_dropout = nn.Identity()  # the dropout sits after A, one mask per head
        random_init_(self, gamma, code_faithful)
        compensate_(self, head_weights(self, head_reduction))

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        z = F.linear(x, self.lora_A.weight)                                          # A x: the A-output
        c = head_weights(self, self.head_reduction)
        if self.training and self.dropout_p > 0:  # c·drop_i(z), one mask per head: N·r wide
            u = drop_heads(z, self.heads, self.dropout_p, True) * c.to(x.dtype).unsqueeze(-1)
            B = self.scaling * self.lora_B.weight
        else:  # the same z for every head: (Σ_i c B_i) z, r wide
            u, B = z.unsqueeze(-2), (self.scaling * (c[:, None, None] * self.lora_B.weight).sum(0)).unsqueeze(0)
        return self.add(h, sum_heads(u, B, F.linear(x, self.comp_A), -self.comp_B), z, a_outputs)

    def lowrank(self, task=None):
        no_task(task)
        return heads_lowrank(self, head_weights(self, self.head_reduction))


class MTLLoRALinear(AdapterLinear):
    """MTL-LoRA (METHODS §2.7), for a sample of task t:

        z = Λ_t A drop(x),   B̃_t = Σ_j softmax(w_t / τ)_j B_j,   h = W0 x + b + s·B̃_t z

    Λ_t = I, B_j = 0, τ = 0.1. ΔW depends on t: merge or export one task at a time. A-output: A·drop(x), before Λ_t.
    """
    mergeable, needs_task_ids = False, True

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, num_tasks=None, temperature=0.1,
                 diagonal=False):
        super().__init__(base, rank, alpha, dropout)
        if not num_tasks or int(num_tasks) < 1:
            raise ValueError("mtl adapters need num_tasks >= 1 (the number of distinct task ids)")
        if int(heads) < 1 or temperature <= 0:
            raise ValueError(f"mtl needs heads >= 1 and temperature > 0, got {heads}, {temperature}")
        T, r = int(num_tasks), self.rank
        self.num_tasks, self.heads, self.temperature, self.diagonal = T, int(heads), temperature, diagonal
        self.lora_A = self.new(r, self.in_features)
        self.lora_lambda = self.new(T, r) if diagonal else self.new(T, r, r)
        self.lora_B = self.new(self.heads, self.out_features, r)  # zeros
        self.lora_mix = self.new(T, self.heads)
        kaiming_(self.lora_A.weight)
        kaiming_(self.lora_mix.weight)
        with torch.no_grad():
            self.lora_lambda.weight.copy_(torch.ones(T, r) if diagonal else torch.eye(r).expand(T, r, r))

    def task_ids(self, x):
        t = self.adapter_ctx.task_ids if self.adapter_ctx is not None else None
        if t is None:
            raise ValueError("MTL-LoRA needs per-sample task ids: run the forward (and, with gradient checkpointing, "
                             "the backward) inside adapter_context(model, task_ids=...)")
        if x.dim() < 2 or x.shape[0] != t.shape[0]:
            raise ValueError(f"task_ids has {t.shape[0]} entries but the input batch has {x.shape[0]} rows")
        return t

    def mixing(self, t):
        return (self.lora_mix.weight[t] / self.temperature).softmax(-1)  # softmax(w_t / τ) [b, n_B]

    def transform(self, t):
        lam = self.lora_lambda.weight[t]
        return torch.diag_embed(lam) if self.diagonal else lam  # Λ_t [b, r, r]

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        t = self.task_ids(x)
        b, r = x.shape[0], self.rank
        z = F.linear(self.lora_dropout(x), self.lora_A.weight)              # A drop(x): the A-output
        zt = z.reshape(b, -1, r) @ self.transform(t).transpose(1, 2)       # Λ_t z, one bmm over the batch
        u = zt.unsqueeze(-2) * self.mixing(t)[:, None, :, None]            # [b, L, n_B, r]: head j's input
        delta = self.scaling * sum_heads(u, self.lora_B.weight)            # s·B̃_t Λ_t z
        return self.add(h, delta.reshape(*x.shape[:-1], self.out_features), z, a_outputs)

    def lowrank(self, task=None):
        """ΔW_t = s·B̃_t Λ_t A for one task t: rank r, the factors (s·B̃_t Λ_t, A)."""
        if task is None:
            raise ValueError("ΔW depends on the task id (ΔW_t = s·B̃_t Λ_t A); pass task=<id> for the plain LoRA of "
                             "one task")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be a task id in [0, {self.num_tasks}) (num_tasks={self.num_tasks}), "
                             f"got {task!r}")
        t = torch.tensor([task], device=self.lora_A.weight.device)
        Bt = torch.einsum("n,nor->or", self.mixing(t)[0], self.lora_B.weight).float()
        return self.scaling * Bt @ self.transform(t)[0].float(), self.lora_A.weight.float(), 1.0


class MultiLoRALinear(AdapterLinear):
    """MultiLoRA (METHODS §2.8): h = W0 x + b + s·Σ_i diag(g_i) B_i A_i drop(x), n = `heads` pairs.

    A_i, B_i non-zero and g_i = 0, so ΔW = 0 at step 0; g_i ∈ R^out ("vector", the repo's) or a scalar (the paper's).
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, scale_granularity="vector"):
        super().__init__(base, rank, alpha, dropout)
        if scale_granularity not in ("vector", "scalar"):
            raise ValueError(f"scale_granularity must be 'vector' or 'scalar', got {scale_granularity!r}")
        n, r = int(heads), self.rank
        self.heads, self.scale_granularity = n, scale_granularity
        self.lora_A = self.new(n, r, self.in_features)
        self.lora_B = self.new(n, self.out_features, r)
        self.lora_scale = self.new(n, self.out_features) if scale_granularity == "vector" else self.new(n)  # zeros
        kaiming_(self.lora_A.weight)
        kaiming_(self.lora_B.weight)

    def gB(self):
        g = self.lora_scale.weight
        return self.lora_B.weight * (g[:, :, None] if g.dim() == 2 else g[:, None, None])  # diag(g_i) B_i [n, out, r]

    def forward(self, x, a_outputs=None):
        h, x = self.frozen(x)
        z = F.linear(self.lora_dropout(x), self.lora_A.weight.flatten(0, 1))       # [A_1; …; A_n] drop(x), one matmul
        delta = sum_heads(z.unflatten(-1, (self.heads, self.rank)), self.scaling * self.gB())
        return self.add(h, delta, z, a_outputs)

    def lowrank(self, task=None):
        no_task(task)  # [diag(g_1)B_1 | … | diag(g_n)B_n]·[A_1; …; A_n]: rank ≤ n·r
        return self.scaling * torch.cat(list(self.gB()), 1).float(), self.lora_A.weight.flatten(0, 1).float(), 1.0


KINDS = {  # --adapter name -> (class, fixed options)
    "lora": (LoRALinear, {}),
    "align": (LoRALinear, {}),
    "hydra": (HydraLoRALinear, {}),
    "hydra-norouter": (HydraNoRouterLinear, {}),
    "rlora": (RLoRALinear, {}),
    "mlora": (MLoRALinear, {}),
    "mtl": (MTLLoRALinear, {}),
    "multilora": (MultiLoRALinear, {}),
}


# ----------------------------------------------------------------------------- model-level API

def adapter_modules(model):
    """[(module path, adapter)] in model order."""
    return [(m.adapter_name or n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def split_targets(targets):
    """("q_proj", ...) from a tuple or a comma-separated string."""
    targets = tuple(t for t in (targets.split(",") if isinstance(targets, str) else targets) if t)
    if "lm_head" in targets:
        raise ValueError("lm_head is never adapted (it is tied to the embeddings in many models); drop it from targets")
    return targets


def target_linears(model, targets):
    """[(name, nn.Linear)] whose name ends in one of `targets` (never lm_head)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and n.rsplit(".", 1)[-1] != "lm_head"]


def adapter_args(kind, rank, alpha, dropout, heads, num_tasks, options):
    """(class, keyword arguments) for one adapter of `kind`: heads / num_tasks only to the classes that take them."""
    cls, fixed = KINDS[kind]
    params = inspect.signature(cls.__init__).parameters
    args = dict(rank=rank, alpha=alpha, dropout=dropout, **fixed, **options)
    args.update({k: v for k, v in (("heads", heads), ("num_tasks", num_tasks)) if k in params})
    return cls, args


def apply_adapter(model, kind, rank=8, alpha=16, targets=DEFAULT_TARGETS, heads=3, dropout=0.0, num_tasks=None,
                  **options):
    """Replace every nn.Linear named in `targets` by a `kind` adapter (extra `options` go to its class); freeze the
    rest. The configuration is recorded in `model.adapter_config`."""
    if getattr(model, "adapter_config", None):
        raise ValueError(f"model already has a {model.adapter_config['kind']!r} adapter; merge_adapters() it or "
                         "start from a fresh base model")
    targets = split_targets(targets)
    found = target_linears(model, targets)
    if not found:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear named {list(targets)} in the model; its linear layers are named {have}")
    cls, args = adapter_args(kind, rank, alpha, dropout, heads, num_tasks, options)
    adapters = [cls(lin, **args) for _, lin in found]  # all built before the model is touched
    for p in model.parameters():
        p.requires_grad_(False)
    for (name, lin), adapter in zip(found, adapters):
        parent, _, child = name.rpartition(".")
        adapter.adapter_name = name
        adapter.train(lin.training)  # a new module starts in train mode; keep the model's mode (dropout!)
        adapter.requires_grad_(True)
        adapter.weight.requires_grad_(False)
        if adapter.bias is not None:
            adapter.bias.requires_grad_(False)
        setattr(model.get_submodule(parent) if parent else model, child, adapter)
    cfg = getattr(model, "config", None)
    signature = {k: getattr(cfg, k) for k in ("arch", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size")
                 if hasattr(cfg, k)}
    model.adapter_config = {
        "format": "nanoalign-adapter", "kind": kind, "rank": int(rank), "alpha": alpha, "dropout": dropout,
        "targets": list(targets), "heads": args.get("heads"), "num_tasks": args.get("num_tasks"), "options": options,
        "base_model": getattr(model, "name_or_path", None), "base_config": signature,
        "modules": {n: [m.out_features, m.in_features] for n, m in found},
    }
    return model


def merge_adapters(model, task=None):
    """W0 ← W0 + ΔW (ΔW_t of `task` for MTL-LoRA) in every adapter, which becomes a plain nn.Linear again."""
    mods = adapter_modules(model)
    if not mods:
        raise ValueError("model has no adapters to merge")
    with torch.no_grad():
        for _, m in mods:  # ask every adapter first: a refusal never leaves a half-merged model behind
            try:
                m.lowrank(task)
            except ValueError as e:
                kind = (getattr(model, "adapter_config", None) or {}).get("kind", type(m).__name__)
                for_task = "" if task is None else f" for task {task!r}"
                raise ValueError(f"{kind} adapters cannot be merged{for_task}: {e}") from None
    for name, m in mods:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.merge(task))
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def count_trainable(model) -> int:
    """Number of trainable parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rank_for_budget(model_or_cfg, targets, budget_params) -> int:
    """The plain-LoRA rank whose trainable count r·Σ(d_in + d_out) over the targets is closest to the budget (§2.2)."""
    model = model_or_cfg
    if not isinstance(model, nn.Module):
        from .model import CausalLM, ModelConfig
        cfg = ModelConfig.from_hf_dict(model) if isinstance(model, dict) else model
        with torch.device("meta"):
            model = CausalLM(cfg)
    targets = split_targets(targets)
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, AdapterLinear)) and n.rsplit(".", 1)[-1] in targets)
    if per_rank == 0:
        raise ValueError(f"no linear layers named {list(targets)} in the model")
    return max(1, round(budget_params / per_rank))
