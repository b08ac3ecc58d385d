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
    hydra-norouter   h = W0 x + b + s·Σ_i B_i A drop(x)                             §2.4
    rlora            h = W0 x + b − C x + s·Σ_i ω_i(x) B_i drop_i(A x)             §2.5 (random init, C = compensation)
    mlora            h = W0 x + b − C x + s·Σ_i B_i drop_i(A x)                    §2.6
    mtl              h = W0 x + b + s·(Σ_j softmax(w_t/τ)_j B_j) Λ_t A drop(x)      §2.7 (t = the sample's task)
    multilora        h = W0 x + b + s·Σ_i diag(g_i) B_i A_i drop(x)                §2.8

Heads are computed in one matmul: Σ_i B_i u_i = [B_1 | … | B_N] · [u_1; …; u_N].

R-LoRA / M-LoRA compensation. The R-LoRA code edits the base weight once, W0 ← W0 − C with C = s·(1/N)Σ_i B_i A at
init. We keep W0 untouched and subtract C x in the forward, storing C as two frozen rank-r buffers
(`comp_B` [out, r] = s·Σ_i c_i B_i⁰, `comp_A` [r, in] = A⁰). The function is the same, but the base checkpoint stays
valid, bf16 rounding of an edited W0 is avoided, and the saved adapter carries C, so `load_adapter` on a fresh base
reproduces the trained model exactly. Merging / PEFT export fold −C in (M-LoRA exports at rank 2r).

Task ids and A-outputs travel through `adapter_context` (no hooks): the A-output each adapter reports is the
tensor Align-LoRA aligns (METHODS §3.1). Inside nanoalign's decoder an adapter puts it into a dict its decoder block
returns (model.DecoderLayer), so a checkpointed or compiled block has no side effects; an adapter called on its own
stores it in the context directly.
"""

import inspect
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plumbing.hub import loadable_name
from .plumbing.system import write_atomic

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CAPABILITIES = ("mergeable", "merges_per_task", "needs_task_ids", "has_heads", "has_router")  # AdapterLinear's


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
    """Share one AdapterContext with every adapter of `model` for the duration of the block; yields it.

    The context also goes to the modules that hand A-outputs over (nanoalign's Decoder: `adapter_ctx`). With
    gradient checkpointing the forward is re-run during backward: MTL-LoRA then needs its task ids again, so call
    `.backward()` inside the block. Entries of `a_outputs` are overwritten, never appended, so a re-run never
    duplicates them, and a call without grad never replaces an entry that has grad.
    """
    mods = [m for m in model.modules() if isinstance(m, AdapterLinear)]
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
    ctx = AdapterContext(task_ids=task_ids, collect=collect)
    previous = [m.ctx for m in mods], [m.adapter_ctx for m in hosts]
    for m in mods:
        m.ctx = ctx
    for m in hosts:
        m.adapter_ctx = ctx
    try:
        yield ctx
    finally:
        for m, p in zip(mods, previous[0]):
            m.ctx = p
        for m, p in zip(hosts, previous[1]):
            m.adapter_ctx = p


# ----------------------------------------------------------------------------- shared pieces

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


def side_by_side(B):
    """[N, out, r] -> [out, N·r] = [B_1 | … | B_N], so that Σ_i B_i u_i is one matmul with [u_1; …; u_N]."""
    return B.permute(1, 0, 2).reshape(B.shape[1], -1)


class RouterLogits(torch.autograd.Function):
    """Router logits x W_r^T computed in fp32, keeping x in its own dtype for the backward (METHODS §2.3).

    `F.linear(x.float(), W_r)` would keep the fp32 copy of x for W_r's gradient: on a bf16 base a second, twice as
    large copy of every routed layer's input (~7 GB for Qwen2.5-7B at 8 x 4096 tokens). Here the backward makes
    that copy for one layer at a time. With an fp32 x it is the same computation as F.linear.
    """

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


class AdapterLinear(nn.Module):
    """Frozen base linear + adapter. Subclasses define `adapter_out(x)` and `lowrank()` (ΔW = B_eff A_eff).

    The capability attributes below say what callers may do with an adapter, so that train.py, evaluate.py and the
    tutorials ask `adapter_capabilities(model)` instead of testing kind names. A new adapter class sets the ones that
    differ from these defaults (and overrides `capabilities` only if an option changes one, as HydraLoRA's router).
    """
    mergeable = True         # eval-mode ΔW is one fixed matrix: merge_adapters / export_peft work as they are
    merges_per_task = False  # ΔW depends on the task id, and is one fixed matrix per task: merge / export task=t
    needs_task_ids = False   # the forward reads per-sample task ids from adapter_context(task_ids=...)
    has_heads = False        # several up-projections, lora_B [N, out, r] (head similarity, METHODS §4.1)
    has_router = False       # the head weights depend on the input x
    unmergeable_reason = ""

    @classmethod
    def capabilities(cls, **options) -> dict:
        """{capability: bool} of an adapter of this class built with `options` (a kind's fixed and extra ones)."""
        return {k: getattr(cls, k) for k in CAPABILITIES}

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
        self.ctx: AdapterContext | None = None
        self.adapter_name = ""  # full module path, set by apply_adapter; keys of ctx.a_outputs and saved tensors

    def new(self, *shape):
        return Weight(*shape, device=self.weight.device)

    def forward(self, x, a_outputs=None):
        """h = W0 x + b + adapter(x), with (adapter(x), A-output) = self.adapter_out(x). `a_outputs`: a dict (from
        the decoder block) that receives the A-output."""
        y = F.linear(x, self.weight, self.bias)
        # adapter weights stay fp32 on a bf16 base; under autocast the matmuls pick their dtype themselves
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        out, z = self.adapter_out(xa)
        self.report(z, a_outputs)
        return y + out.to(y.dtype)

    def report(self, z, a_outputs=None):
        """Hand the A-output z to the alignment loss (METHODS §3.1): into `a_outputs` when the decoder block passed
        one (it returns them, model.DecoderLayer), else into the active context if it collects."""
        if a_outputs is not None:
            a_outputs[self.adapter_name] = z
        elif self.ctx is not None and self.ctx.collect:
            self.ctx.put(self.adapter_name, z)

    def delta_weight(self, task=None):
        """Dense eval-mode ΔW [out, in] in fp32 (compensation included), so that h = (W0 + ΔW) x + b."""
        B, A = self.lowrank(task)
        return B @ A

    def merge_problem(self, task=None):
        """Why ΔW is not one fixed matrix (None when it is): without `task` for every task, with `task` for that one."""
        if task is None:
            return None if self.mergeable else self.unmergeable_reason
        if not self.merges_per_task:
            return "task= is only for adapters whose ΔW depends on the task (mtl); this one has one ΔW, drop task="
        return self.task_problem(task)

    def peft_form(self, task=None):
        """(B, A, lora_alpha, use_rslora) of the PEFT LoRA with this eval-mode ΔW: the exact low-rank form with s
        folded into B (lora_alpha None: PEFT's alpha is set to the rank of the form, so its scale is 1)."""
        B, A = self.lowrank(task)
        return B, A, None, False

    @torch.no_grad()
    def merge(self, task=None) -> nn.Linear:
        """A plain nn.Linear with W0 + ΔW (ΔW_t with `task`): the same eval-mode function, without the adapter."""
        problem = self.merge_problem(task)
        if problem:
            raise ValueError(f"{type(self).__name__} cannot be merged: {problem}")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        merged = (self.weight.float() + self.delta_weight(task).to(self.weight.device)).to(self.weight.dtype)
        lin.weight = nn.Parameter(merged, requires_grad=False)
        lin.bias = self.bias
        return lin

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, s={self.scaling:.4g}"


# ----------------------------------------------------------------------------- the adapters

class LoRALinear(AdapterLinear):
    """LoRA (METHODS §2.1): h = W0 x + b + s·B A drop(x), A kaiming-uniform, B = 0, s = α/r.

    Also high-rank LoRA (§2.2, pick the rank with `rank_for_budget`) and Align-LoRA (§2.10: the alignment loss on
    the reported A-output A·drop(x) lives in align.py).
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, rank_stabilized=False):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        self.lora_A = self.new(self.rank, self.in_features)
        self.lora_B = self.new(self.out_features, self.rank)  # zeros: ΔW = 0 at step 0
        kaiming_(self.lora_A.weight)

    def adapter_out(self, x):
        z = F.linear(self.lora_dropout(x), self.lora_A.weight)
        return F.linear(z, self.scaling * self.lora_B.weight), z  # s on the [out, r] weight, not the [.., out] output

    def lowrank(self, task=None):
        return self.scaling * self.lora_B.weight.float(), self.lora_A.weight.float()

    def peft_form(self, task=None):
        """A and B as they are, with PEFT's own α and rsLoRA flag: a 1:1 PEFT LoRA."""
        return self.lora_B.weight, self.lora_A.weight, self.alpha, self.rank_stabilized


class HydraLoRALinear(AdapterLinear):
    """HydraLoRA (METHODS §2.3): shared A, N heads B_i (zero init), dense softmax router W_r [N, in] (no bias).

        h = W0 x + b + s·Σ_i ω_i(x) B_i A drop(x),   ω(x) = softmax(W_r x) in fp32 on the un-dropped x

    One dropout mask on x, shared by all heads. `router=False` is the §2.4 ablation (ω_i = 1, or 1/N with
    head_reduction="mean"): every head then gets the same gradient and, starting from 0, stays equal to the others.
    A-output: A·drop(x).
    """
    head_dropout = False  # R-LoRA moves dropout after A, one mask per head
    has_heads = True
    has_router, mergeable = True, False  # the defaults (router=True); __init__ sets both from `router`
    unmergeable_reason = "its router makes ΔW depend on the input x; it needs the unmerged heads"

    @classmethod
    def capabilities(cls, **options):
        router = bool(options.get("router", cls.has_router))  # hydra-norouter: no router, so ΔW is fixed
        return {**super().capabilities(), "has_router": router, "mergeable": not router}

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, router=True, head_reduction="sum",
                 rank_stabilized=False):
        super().__init__(base, rank, alpha, dropout, rank_stabilized)
        if int(heads) < 1:
            raise ValueError(f"heads must be a positive integer, got {heads}")
        if head_reduction not in ("sum", "mean"):
            raise ValueError(f"head_reduction must be 'sum' or 'mean', got {head_reduction!r}")
        self.heads, self.head_reduction = int(heads), head_reduction
        self.lora_A = self.new(self.rank, self.in_features)
        self.lora_B = self.new(self.heads, self.out_features, self.rank)  # zeros
        kaiming_(self.lora_A.weight)
        self.lora_router = self.new(self.heads, self.in_features) if router else None
        if router:
            kaiming_(self.lora_router.weight)
        self.has_router, self.mergeable = bool(router), not router

    def fixed_head_weights(self):
        """Head weights without input dependence: 1/N for a router (uniform), else 1 (sum) or 1/N (mean)."""
        w = 1.0 / self.heads if self.lora_router is not None or self.head_reduction == "mean" else 1.0
        return torch.full((self.heads,), w, device=self.lora_A.weight.device)

    def head_weights(self, x):
        """ω(x) [..., N]; the router runs in fp32 even under autocast (a bf16 softmax is coarse), then cast back."""
        if self.lora_router is None:
            return self.fixed_head_weights().to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            logits = RouterLogits.apply(x, self.lora_router.weight)
        return logits.softmax(-1).to(x.dtype)

    def adapter_out(self, x):
        u, W, z = self.heads_input(x)
        return F.linear(u, W), z

    def heads_input(self, x):
        """(u, W, z) with adapter output u W^T: u = [ω_1 z_1; …; ω_N z_N], W = s·[B_1 | … | B_N] (s on the small
        weight, not on the [.., out] output); z is the A-output."""
        N, r = self.heads, self.rank
        per_head_dropout = self.head_dropout and self.training and self.dropout_p > 0
        if self.head_dropout:  # R-LoRA: z = A x, then an independent dropout mask per head
            z = F.linear(x, self.lora_A.weight)
        else:                  # HydraLoRA: one mask on x before A, shared by the heads
            z = F.linear(self.lora_dropout(x), self.lora_A.weight)
        if self.lora_router is None and not per_head_dropout:
            # fixed weights c_i and the same z for every head: Σ_i c_i B_i z = (Σ_i c_i B_i) z, an r-wide matmul
            # instead of an N·r-wide one (elementwise sum: stays fp32 under autocast)
            c = self.fixed_head_weights()
            return z, self.scaling * (c[:, None, None] * self.lora_B.weight).sum(0), z
        if per_head_dropout:
            u = F.dropout(z.unsqueeze(-2).expand(*z.shape[:-1], N, r), self.dropout_p, self.training)
        else:
            u = z.unsqueeze(-2)
        u = u * self.head_weights(x).unsqueeze(-1)  # [..., N, r]: head i's input ω_i·z_i
        return u.flatten(-2), self.scaling * side_by_side(self.lora_B.weight), z

    def lowrank(self, task=None):
        """ΔW with the fixed head weights (for a router: what a uniform router would give; analysis only)."""
        c = self.fixed_head_weights()
        B = self.scaling * torch.einsum("n,nor->or", c, self.lora_B.weight.float())
        return B, self.lora_A.weight.float()


class RLoRALinear(HydraLoRALinear):
    """R-LoRA (METHODS §2.5): HydraLoRA with multi-head dropout and multi-head random init.

        h = W0 x + b − C x + s·Σ_i ω_i(x) B_i drop_i(A x),   s = α/√r (rank_stabilized, as the R-LoRA script sets)

    Init ("unit" + "stable"): A ~ N(0, 1/max(r, d_in)), each B_i ~ N(0, 1/max(d_out, r)), all multiplied by
    d_out^{1/4}/√γ (paper). `code_faithful=True` reproduces the released code instead: factor r^{1/4}/√γ, applied
    inside the per-head loop, so A is multiplied N times and head i (0-based) N−i times.
    Compensation C = s·(1/N)Σ_i B_i⁰ A⁰ is taken once at init and kept as frozen buffers (module docstring). It
    cancels the initial adapter output exactly only for a uniform router (ω_i = 1/N); with the kaiming-initialised
    router it cancels approximately, as in the original. A-output: A x (before the per-head dropout).

    The R-LoRA paper's ablation (METHODS §6.1 Table 4) switches the two ingredients separately:
    `multi_head_dropout=False` keeps HydraLoRA's one mask on x ("+Init" only), `random_init=False` keeps HydraLoRA's
    kaiming A and zero heads, so C = 0 ("+MT" only). Both False is HydraLoRA with R-LoRA's scaling (bit-identical to
    HydraLoRALinear(rank_stabilized=True) from the same seed; tests/test_adapters.py).
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, router=True, head_reduction="sum",
                 gamma=64.0, code_faithful=False, rank_stabilized=True, multi_head_dropout=True, random_init=True):
        super().__init__(base, rank, alpha, dropout, heads, router, head_reduction, rank_stabilized)
        self.head_dropout = bool(multi_head_dropout)
        if self.head_dropout:
            self.lora_dropout = nn.Identity()  # the dropout sits after A, per head (heads_input)
        A, B, N = self.lora_A.weight, self.lora_B.weight, self.heads
        with torch.no_grad():
            if random_init:  # else HydraLoRA's init stays: A kaiming-uniform, B_i = 0, so C below is 0
                nn.init.normal_(A, std=1 / math.sqrt(max(self.rank, self.in_features)))
                nn.init.normal_(B, std=1 / math.sqrt(max(self.out_features, self.rank)))  # heads independent
                if code_faithful:
                    f = self.rank ** 0.25 / math.sqrt(gamma)
                    A.mul_(f ** N)
                    B.mul_((f ** torch.arange(N, 0, -1, dtype=torch.float64)).to(B)[:, None, None])
                else:
                    f = self.out_features ** 0.25 / math.sqrt(gamma)
                    A.mul_(f)
                    B.mul_(f)
            comp_B, comp_A = super().lowrank()
        # detach: lowrank() hands back lora_A itself (.float() of fp32 is a no-op), and a clone of it would keep a
        # graph to lora_A, so the "frozen" C would send gradient into A (at init, M-LoRA's A got exactly zero)
        self.register_buffer("comp_A", comp_A.detach().clone())
        self.register_buffer("comp_B", comp_B.detach().clone())

    def adapter_out(self, x):
        # −C x joins the heads' matmul: [u, C_A x] · [W | −C_B]^T, one [.., out] output instead of three
        u, W, z = self.heads_input(x)
        return F.linear(torch.cat([u, F.linear(x, self.comp_A)], -1), torch.cat([W, -self.comp_B], 1)), z

    def lowrank(self, task=None):
        """[s·Σ_i c_i B_i | −C_B] · [A; C_A]: rank ≤ 2r, exact (c = fixed head weights)."""
        B, A = super().lowrank()
        return torch.cat([B, -self.comp_B.float()], 1), torch.cat([A, self.comp_A.float()], 0)


class MLoRALinear(RLoRALinear):
    """M-LoRA (METHODS §2.6): R-LoRA without the router, heads summed (head_reduction="sum", default) or averaged.

        h = W0 x + b − C x + s·Σ_i B_i drop_i(A x),   C = s·Σ_i B_i⁰ A⁰ (exact: the initial function is the base's)

    Mergeable: in eval mode ΔW = s·(Σ_i B_i) A − C. The paper's sum-vs-mean choice is unknown; it only rescales s.
    """
    has_router, mergeable = False, True

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, heads=3, head_reduction="sum", gamma=64.0,
                 code_faithful=False, rank_stabilized=True):
        super().__init__(base, rank, alpha, dropout, heads, False, head_reduction, gamma, code_faithful,
                         rank_stabilized)


class MTLLoRALinear(AdapterLinear):
    """MTL-LoRA (METHODS §2.7), for a sample of task t:

        z = Λ_t A drop(x),   B̃_t = Σ_j softmax(w_t / τ)_j B_j,   h = W0 x + b + s·B̃_t z

    A kaiming-uniform, Λ_t = I (diagonal=True: a vector of ones), B_j = 0 (`heads` of them), mixing logits
    w [T, n_B] kaiming-uniform, τ = 0.1. Task ids come from `adapter_context(model, task_ids=...)`.
    Mergeable per task only: ΔW_t = s·B̃_t Λ_t A is a plain rank-r LoRA for one fixed task t (`merge_adapters(model,
    task=t)`, `export_peft(model, dir, task=t)`); there is no single merged weight. A-output: A·drop(x) (before Λ_t).
    """
    mergeable, merges_per_task, needs_task_ids, has_heads = False, True, True, True
    unmergeable_reason = ("ΔW depends on the task id (ΔW_t = s·B̃_t Λ_t A); pass task=<id> for the plain LoRA of "
                          "one task")

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
        t = self.ctx.task_ids if self.ctx is not None else None
        if t is None:
            raise ValueError("MTL-LoRA needs per-sample task ids: run the forward (and, with gradient checkpointing, "
                             "the backward) inside adapter_context(model, task_ids=...)")
        if x.dim() < 2 or x.shape[0] != t.shape[0]:
            raise ValueError(f"task_ids has {t.shape[0]} entries but the input batch has {x.shape[0]} rows")
        return t

    def mixing(self, t):
        return (self.lora_mix.weight[t] / self.temperature).softmax(-1)  # [b, n_B]

    def transform(self, t):
        lam = self.lora_lambda.weight[t]
        return torch.diag_embed(lam) if self.diagonal else lam  # Λ_t [b, r, r]

    def adapter_out(self, x):
        t = self.task_ids(x)
        b, r = x.shape[0], self.rank
        z = F.linear(self.lora_dropout(x), self.lora_A.weight)
        zt = z.reshape(b, -1, r) @ self.transform(t).transpose(1, 2)       # Λ_t z, one bmm over the batch
        u = zt.unsqueeze(-2) * self.mixing(t)[:, None, :, None]            # [b, L, n_B, r]
        y = self.scaling * F.linear(u.flatten(-2), side_by_side(self.lora_B.weight))
        return y.reshape(*x.shape[:-1], self.out_features), z

    def task_problem(self, task):
        """Why `task` is not one of this adapter's task ids (None when it is)."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            return f"task must be a task id in [0, {self.num_tasks}) (num_tasks={self.num_tasks}), got {task!r}"
        return None

    def lowrank(self, task=None):
        """ΔW_t = s·B̃_t Λ_t A for one task t: rank r, the factors (s·B̃_t Λ_t, A)."""
        if task is None:
            raise ValueError("MTL-LoRA's ΔW depends on the task: pass task=<id>")
        if problem := self.task_problem(task):
            raise ValueError(problem)
        t = torch.tensor([task], device=self.lora_A.weight.device)
        Bt = torch.einsum("n,nor->or", self.mixing(t)[0], self.lora_B.weight).float()
        return self.scaling * Bt @ self.transform(t)[0].float(), self.lora_A.weight.float()


class MultiLoRALinear(AdapterLinear):
    """MultiLoRA (METHODS §2.8): h = W0 x + b + s·Σ_i diag(g_i) B_i A_i drop(x), n = `heads` pairs.

    A_i and B_i both kaiming-uniform (non-zero), g_i = 0 so ΔW = 0 at step 0. scale_granularity "vector"
    (g_i ∈ R^out, the MTL-LoRA repo's version) or "scalar" (one g_i per pair; the paper's wording).
    A-output: the n A-outputs side by side, [..., n·r] (one matmul with the stacked A).
    """
    has_heads = True  # n up-projections B_i (each with its own A_i)

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

    def stacked(self):
        """([diag(g_1)B_1 | … | diag(g_n)B_n] [out, n·r], [A_1; …; A_n] [n·r, in])."""
        g = self.lora_scale.weight
        gB = self.lora_B.weight * (g[:, :, None] if g.dim() == 2 else g[:, None, None])
        return side_by_side(gB), self.lora_A.weight.flatten(0, 1)

    def adapter_out(self, x):
        B, A = self.stacked()
        z = F.linear(self.lora_dropout(x), A)
        return F.linear(z, self.scaling * B), z

    def lowrank(self, task=None):
        B, A = self.stacked()
        return self.scaling * B.float(), A.float()


KINDS = {  # --adapter name -> (class, fixed options)
    "lora": (LoRALinear, {}),
    "align": (LoRALinear, {}),
    "hydra": (HydraLoRALinear, {"router": True}),
    "hydra-norouter": (HydraLoRALinear, {"router": False}),
    "rlora": (RLoRALinear, {}),
    "mlora": (MLoRALinear, {}),
    "mtl": (MTLLoRALinear, {}),
    "multilora": (MultiLoRALinear, {}),
}


# ----------------------------------------------------------------------------- model-level API

def adapter_modules(model):
    """[(module path, adapter)] in model order."""
    return [(m.adapter_name or n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def _targets(targets):
    targets = tuple(t for t in (targets.split(",") if isinstance(targets, str) else targets) if t)
    if "lm_head" in targets:
        raise ValueError("lm_head is never adapted (it is tied to the embeddings in many models); drop it from targets")
    return targets


def _target_linears(model, targets):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and n.rsplit(".", 1)[-1] != "lm_head"]


def check_options(kind, options):
    """Raise a ValueError naming the valid choices if `kind` is unknown or `options` holds a keyword its class does
    not take (the extra options: everything but rank, alpha, dropout, heads, num_tasks and the kind's fixed ones)."""
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(KINDS)}")
    cls, fixed = KINDS[kind]
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) - {"self", "base", "rank", "alpha", "dropout", "heads", "num_tasks"} - set(fixed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"adapter {kind!r} has no option {unknown[0]!r}; its options are {sorted(allowed)}")
    for name, value in options.items():  # a typo like random_init="flase" must not pass as a truthy string
        default = params[name].default
        want = (int, float) if type(default) is float else type(default)
        is_bool = isinstance(value, bool)
        if default is not None and (not isinstance(value, want) or is_bool != isinstance(default, bool)):
            raise ValueError(f"adapter option {name} must be a {type(default).__name__} (default {default!r}), "
                             f"got {value!r}")


def apply_adapter(model, kind, rank=8, alpha=16, targets=DEFAULT_TARGETS, heads=3, dropout=0.0, num_tasks=None,
                  **kw):
    """Replace every nn.Linear whose name ends in one of `targets` by a `kind` adapter; freeze everything else.

    Extra options (kw) go to the adapter class (e.g. rlora: gamma, code_faithful; mlora: head_reduction; mtl:
    temperature, diagonal; multilora: scale_granularity). The configuration is recorded in `model.adapter_config`.
    """
    if getattr(model, "adapter_config", None):
        raise ValueError(f"model already has a {model.adapter_config['kind']!r} adapter; merge_adapters() it or "
                         "start from a fresh base model")
    check_options(kind, kw)
    cls, fixed = KINDS[kind]
    params = inspect.signature(cls.__init__).parameters
    args = dict(rank=rank, alpha=alpha, dropout=dropout, **fixed, **kw)
    if "heads" in params:
        args["heads"] = heads
    if "num_tasks" in params:
        args["num_tasks"] = num_tasks
    targets = _targets(targets)
    found = _target_linears(model, targets)
    if not found:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear named {list(targets)} in the model; its linear layers are named {have}")
    from .plumbing.model_io import memory_bytes
    device, need = found[0][1].weight.device, _adapter_bytes(cls, found, args)  # bad options raise here already
    have = memory_bytes(device)
    if have is not None and need > have:
        raise ValueError(f"rank {rank}: the {kind} adapters need {need:,} bytes ({need / 1e9:,.1f} GB, fp32), more "
                         f"than the {have / 1e9:,.1f} GB of memory on {device}; choose a smaller rank")
    try:
        adapters = [cls(lin, **args) for _, lin in found]  # allocated before the model is touched
    except RuntimeError as e:  # torch.OutOfMemoryError is one; a CPU allocation failure says "can't allocate"
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise ValueError(f"rank {rank}: the {kind} adapters need {need:,} bytes ({need / 1e9:,.1f} GB, fp32), which "
                         f"{device} cannot allocate now; choose a smaller rank or free memory") from None
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
        "targets": list(targets), "heads": args.get("heads"), "num_tasks": args.get("num_tasks"), "options": kw,
        "base_model": getattr(model, "name_or_path", None), "base_config": signature,
        "modules": {n: [m.out_features, m.in_features] for n, m in found},
    }
    return model


def _adapter_bytes(cls, found, args) -> int:
    """Bytes of the adapter tensors (parameters and buffers, not the base weight) `apply_adapter` would allocate,
    counted by building one adapter per distinct layer shape on the meta device (no memory)."""
    shapes = {}
    for _, lin in found:
        shapes[lin.in_features, lin.out_features] = shapes.get((lin.in_features, lin.out_features), 0) + 1
    total = 0
    with torch.device("meta"):
        for (d_in, d_out), n in shapes.items():
            a = cls(nn.Linear(d_in, d_out, bias=False), **args)
            total += n * sum(t.numel() * t.element_size() for t in (*a.parameters(), *a.buffers()) if t is not a.weight)
    return total


def adapter_capabilities(model_or_kind, **options) -> dict:
    """What callers may do with an adapter, without testing its kind name: {capability: bool}.

    `model_or_kind`: a model with an adapter, one adapter module, or a kind name (with its extra `options`).
    Keys: CAPABILITIES (see AdapterLinear) plus `peft_exportable`, true when export_peft writes a plain LoRA, for
    the whole adapter (mergeable) or for one task at a time (merges_per_task: pass task=t).
    """
    if isinstance(model_or_kind, str):
        check_options(model_or_kind, options)
        cls, fixed = KINDS[model_or_kind]
        caps = cls.capabilities(**fixed, **options)
    elif isinstance(model_or_kind, AdapterLinear):
        caps = {k: getattr(model_or_kind, k) for k in CAPABILITIES}
    else:
        cfg = _require_adapter(model_or_kind)
        return adapter_capabilities(cfg["kind"], **cfg["options"])
    return {**caps, "peft_exportable": caps["mergeable"] or caps["merges_per_task"]}


def _merge_refusal(model, task):
    """None when every adapter folds into one weight (for `task` when given), else "<kind> adapters", why."""
    for name, m in adapter_modules(model):
        if problem := m.merge_problem(task):
            return (getattr(model, "adapter_config", None) or {}).get("kind", type(m).__name__), problem
    return None


def merge_adapters(model, task=None):
    """Fold every adapter into its base weight (W0 ← W0 + ΔW) and turn it back into a plain nn.Linear.

    `task`: for adapters whose ΔW depends on the task (MTL-LoRA, `merges_per_task`), fold in ΔW_t of that task id;
    the merged model then computes what the adapter computes for samples of task t.
    """
    if not adapter_modules(model):
        raise ValueError("model has no adapters to merge")
    refused = _merge_refusal(model, task)  # check all first: never leave a half-merged model behind
    if refused:
        for_task = "" if task is None else f" for task {task!r}"
        raise ValueError(f"{refused[0]} adapters cannot be merged{for_task}: {refused[1]}")
    for name, m in adapter_modules(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.merge(task))
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


def count_trainable(model) -> int:
    """Number of trainable parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rank_for_budget(model_or_cfg, targets, budget_params) -> int:
    """The plain-LoRA rank whose trainable count r·Σ(d_in + d_out) over the targets is closest to the budget (§2.2).

    `model_or_cfg`: an nn.Module (a meta-device model is fine), a ModelConfig, or a Hugging Face config dict.
    """
    model = model_or_cfg
    if not isinstance(model, nn.Module):
        from .model import CausalLM, ModelConfig
        cfg = ModelConfig.from_hf_dict(model) if isinstance(model, dict) else model
        with torch.device("meta"):
            model = CausalLM(cfg)
    targets = _targets(targets)
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, AdapterLinear)) and n.rsplit(".", 1)[-1] in targets)
    if per_rank == 0:
        raise ValueError(f"no linear layers named {list(targets)} in the model")
    return max(1, round(budget_params / per_rank))


# ----------------------------------------------------------------------------- save / load / PEFT export

MAX_ALPHA = 1e6  # no LoRA recipe comes near; alpha = 1e308 in a saved config made every logit non-finite


def _require_adapter(model):
    cfg = getattr(model, "adapter_config", None)
    if not cfg:
        raise ValueError("model has no adapter: call apply_adapter(model, kind, ...) or load_adapter(model, dir) first")
    return cfg


def _atomic_write(path: Path, write):
    """system.write_atomic of `write(tmp)`: `path` is either the old file or the complete new one. A failure (disk
    full, read-only directory) leaves no temporary file and raises one OSError line naming `path`."""
    from safetensors import SafetensorError  # what save_file raises when its own write fails
    try:
        write_atomic(path, write)
    except (OSError, SafetensorError) as e:
        raise OSError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); free disk space or choose a "
                      "writable directory") from None


def _adapter_tensors(model):
    """{'<module path>.<local key>': tensor} for the adapter tensors only (no frozen weight/bias)."""
    return {f"{name}.{k}": v for name, m in adapter_modules(model)
            for k, v in m.state_dict(keep_vars=True).items() if k not in ("weight", "bias")}


def save_adapter(model, directory):
    """Write `adapter.safetensors` (adapter tensors only) and `adapter_config.json` into `directory`, atomically."""
    from safetensors.torch import save_file
    cfg = _require_adapter(model)
    d = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _adapter_tensors(model).items()}
    if any(t.is_meta for t in tensors.values()):
        raise ValueError("cannot save an adapter that lives on the meta device (it has no values)")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the adapter directory {d} ({e.strerror or e}); choose a writable path") from None
    _atomic_write(d / "adapter.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(d / "adapter_config.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))


def load_adapter(model, directory):
    """Load an adapter saved by `save_adapter`; applies it first when the model has none. Returns the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    d = Path(directory)
    cfg_file, st_file = d / "adapter_config.json", d / "adapter.safetensors"
    if not cfg_file.is_file() or not st_file.is_file():
        raise FileNotFoundError(f"{d}: not a nanoalign adapter directory (needs adapter_config.json and "
                                "adapter.safetensors, as written by save_adapter)")
    try:
        saved = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e}); the adapter is damaged: save or copy it again") from None
    if not isinstance(saved, dict) or saved.get("format") != "nanoalign-adapter":
        raise ValueError(f"{cfg_file}: not a nanoalign adapter config (a PEFT directory? load those with peft)")
    lacking = [k for k in ("kind", "rank", "alpha", "dropout", "targets", "heads", "num_tasks", "options",
                           "modules") if k not in saved]
    if lacking:
        raise ValueError(f"{cfg_file}: incomplete adapter config, missing {', '.join(lacking)}; the adapter is "
                         "damaged: save or copy it again")
    if not isinstance(saved["modules"], dict) or not isinstance(saved["options"], dict):
        raise ValueError(f"{cfg_file}: 'modules' and 'options' must be JSON objects; save or copy the adapter again")
    alpha = saved["alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"{cfg_file}: alpha {alpha!r} is not a scale numerator in (0, {MAX_ALPHA:g}]; the adapter is "
                         "damaged: save or copy it again")
    have = {n: [m.out_features, m.in_features] for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, AdapterLinear))}
    for name, shape in saved["modules"].items():
        if have.get(name) != shape:
            raise ValueError(f"{d}: adapter was trained on a base where {name} is {shape}, but this model has "
                             f"{have.get(name, 'no such layer')}; load it into the base model it was trained on")
    current = getattr(model, "adapter_config", None)
    if current is None:
        try:
            apply_adapter(model, saved["kind"], rank=saved["rank"], alpha=saved["alpha"], targets=saved["targets"],
                          heads=saved["heads"], dropout=saved["dropout"], num_tasks=saved["num_tasks"],
                          **saved["options"])
        except (TypeError, ValueError) as e:  # a hand-edited value: name the file it came from
            raise ValueError(f"{cfg_file}: {e}") from None
        current = model.adapter_config
    for key in ("kind", "rank", "alpha", "heads", "num_tasks", "options", "modules"):
        if current[key] != saved[key]:
            raise ValueError(f"{d}: saved adapter has {key}={saved[key]!r} but the model's adapter has "
                             f"{current[key]!r}; load it into a fresh base model instead")
    try:
        tensors = load_file(str(st_file))
    except SafetensorError as e:
        raise ValueError(f"{st_file}: corrupt or truncated safetensors file ({e}); save or copy the adapter "
                         "again") from None
    expected = _adapter_tensors(model)
    for k in sorted(set(expected) | set(tensors)):
        if k not in tensors or k not in expected or tensors[k].shape != expected[k].shape:
            raise ValueError(f"{st_file}: tensor {k!r} is missing, unexpected or of the wrong shape; the file does "
                             "not match its adapter_config.json")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return model


def export_peft(model, directory, base_model_name_or_path=None, task=None):
    """Write a Hugging Face PEFT LoRA directory (`adapter_model.safetensors` + `adapter_config.json`).

    lora/align export their A and B as they are. hydra-norouter, mlora and multilora export their exact merged
    low-rank form ΔW = B_eff A_eff with s folded into B_eff (PEFT sees r = lora_alpha = rank of the form, scale 1):
    rank r, 2r (M-LoRA: [s·ΣB_i | −C_B]·[A; C_A] carries the init compensation) and n·r. MTL-LoRA exports one task
    (`task=t`): ΔW_t = (s·B̃_t Λ_t)·A at rank r. Routers (hydra, rlora) have no PEFT LoRA form and raise.
    `base_model_name_or_path` is written as `hub.loadable_name` spells it (an absolute directory, or a repo id), so
    `AutoPeftModelForCausalLM.from_pretrained(directory)` finds the base without nanoalign and offline.
    """
    from safetensors.torch import save_file
    cfg = _require_adapter(model)
    refused = _merge_refusal(model, task)
    if refused:
        for_task, hint = ("", "; use save_adapter (nanoalign format)") if task is None else (f" for task {task!r}", "")
        raise ValueError(f"{refused[0]} adapters have no PEFT LoRA form{for_task}: {refused[1]}{hint}")
    tensors, ranks = {}, set()
    for name, m in adapter_modules(model):
        with torch.no_grad():
            B, A, alpha, rslora = m.peft_form(task)
        folded = alpha is None
        alpha = A.shape[0] if folded else alpha
        ranks.add(A.shape[0])
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    (r,) = ranks
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in cfg["modules"]}), "lora_dropout": cfg["dropout"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
        "base_model_name_or_path": loadable_name(base_model_name_or_path or cfg.get("base_model")),
    }
    note = {"exported_from": cfg["kind"], "rank": cfg["rank"], "alpha": cfg["alpha"], "heads": cfg["heads"],
            "exported_rank": r, "scaling_folded_into_B": folded, "task": task}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(d / "adapter_config.json", lambda p: p.write_text(json.dumps(peft_cfg, indent=2)))
    _atomic_write(d / "nanoalign_export.json", lambda p: p.write_text(json.dumps(note, indent=2)))
    return d


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a task name usable as a directory name as it is


def export_peft_dirs(model, directory, task_names=(), base_model_name_or_path=None):
    """The PEFT LoRA form of a trained adapter: `directory` itself, or for an adapter with one ΔW per task
    (MTL-LoRA, `merges_per_task`) `directory/<task>` for each of `task_names` (in task-id order: the i-th holds
    ΔW_i). A task name that is not a plain file name (names come from data files), or that repeats an earlier one
    (case-insensitively), becomes `task<id>` (made unique), so no directory is written outside `directory` and no
    task's export replaces another's. Returns what was written, for a log line; a ValueError where there is no PEFT
    form (routers) or no task names for a per-task adapter."""
    d = Path(directory)
    if not adapter_capabilities(model)["merges_per_task"]:
        export_peft(model, d, base_model_name_or_path=base_model_name_or_path)
        return f"{d} (PEFT LoRA)"
    if not task_names:
        raise ValueError("a per-task adapter (MTL-LoRA) exports one PEFT LoRA per task and needs the task names "
                         "(adapter/tasks.json, written by train.py)")
    dirs, seen = [], set()
    keep = {t.lower(): i for i, t in reversed(list(enumerate(task_names))) if SAFE_NAME.fullmatch(t)}  # first
    for i, t in enumerate(task_names):
        name = t if keep.get(t.lower()) == i else f"task{i}"
        while name.lower() in seen or (name != t and name.lower() in keep):
            name += "_"
        seen.add(name.lower())
        dirs.append(name)
    for i, name in enumerate(dirs):
        export_peft(model, d / name, base_model_name_or_path=base_model_name_or_path, task=i)
    return f"{d}/{{{','.join(dirs)}}} (one PEFT LoRA per task)"
