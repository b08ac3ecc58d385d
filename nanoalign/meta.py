"""MeTA-LoRA (METHODS §2.9): one plain LoRA, trained MAML-style on a few examples per task.

One outer step = one episode of n of the N training tasks (`MetaSampler`), then `meta_step`:

    for each task i of the episode, with disjoint support S_i and query Q_i batches of its few-shot pool:
        θ_i ← θ                               copy of the shared LoRA θ = {A, B}: new tensors, θ is never written
        θ_i ← θ_i − α·∇L_{S_i}(θ_i), k times   Phase I, task-specific adaptation (plain SGD)
        g_i = ∇_θ L_{Q_i}(θ_i)                 Phase II; first order takes ∇_{θ_i} L_{Q_i}(θ_i) instead (FOMAML),
                                              second order differentiates through the k inner steps
    θ.grad += mean_i g_i (or Σ_i g_i)          and the caller's AdamW (train.py: --lr, its schedule, clipping) steps θ

The model is called functionally (torch.func.functional_call), so the inner loop needs no second model copy.

The paper's settings were not found (METHODS §2.9); each is a MetaConfig field (flag --meta-<field>), default:
  tasks n        4 per episode (a third-party reimplementation's value), capped at N
  support/query  4 + 4 examples per task, drawn without replacement, so S_i ∩ Q_i = ∅
  inner_steps k  1; 0 makes MeTA-LoRA plain multi-task LoRA on the query batches
  inner_lr α     0.03 (plain SGD; the reimplementation's 1e-4 barely moves a LoRA)
  agg            mean over the episode's tasks (or sum)
  order          1, first order (FOMAML); 2 differentiates through the inner steps (math SDPA kernel: the fused
                 kernels have no derivative of their backward)
Each task weighs the same in the aggregate whatever its answer lengths (a token mean per task batch), and all k
inner steps reuse one support batch (MAML). Gradient checkpointing is refused: its recompute would see θ, not θ_i.
"""

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adapters import adapter_context
from .data import IGNORE_INDEX, answer_positions, logit_indices, pad_right


@dataclass
class MetaConfig:
    """MeTA-LoRA's options (module docstring). inner_lr 0.03: one SGD step clearly lowers a fresh LoRA's support
    loss yet stays ~10x below the step that overshoots (the landscape sharpens as θ trains)."""
    tasks: int = 4          # n, tasks per episode (capped at the number of tasks)
    support: int = 4        # |S_i|, support examples per task and episode
    query: int = 4          # |Q_i|, query examples per task and episode
    inner_steps: int = 1    # k, SGD steps on the support batch
    inner_lr: float = 3e-2  # α, their learning rate
    agg: str = "mean"       # aggregation of the per-task query gradients: mean or sum
    order: int = 1          # 1: first order (FOMAML), 2: through the inner steps

    def __post_init__(self):
        for name in ("tasks", "support", "query"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--meta-{name} must be at least 1, got {getattr(self, name)}")
        if int(self.inner_steps) < 0:
            raise ValueError(f"--meta-inner-steps must not be negative, got {self.inner_steps}")
        if not (math.isfinite(self.inner_lr) and self.inner_lr >= 0):
            raise ValueError(f"--meta-inner-lr must be a finite number >= 0, got {self.inner_lr}")
        if self.agg not in ("mean", "sum"):
            raise ValueError(f"--meta-agg must be 'mean' or 'sum', got {self.agg!r}")
        if self.order not in (1, 2):
            raise ValueError(f"--meta-order must be 1 (first order) or 2 (second order), got {self.order!r}")

    @classmethod
    def from_flags(cls, cfg):
        """MetaConfig from an object with meta_<field> attributes (train.py's TrainConfig)."""
        return cls(**{f.name: getattr(cfg, "meta_" + f.name) for f in fields(cls)})


def limit_shots(by_task, shots, seed=0):
    """{task: rows} with at most `shots` rows per task (the K-shot pools), in their original order; 0/None: all.
    A prefix of a permutation seeded by (seed, task): every trainer sees the same K, and the pools are nested."""
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise ValueError(f"--shots must be a non-negative integer (0: all examples), got {shots!r}")
    out = {}
    for t, rows in by_task.items():
        order = list(range(len(rows)))
        random.Random(f"{seed}/shots/{t}").shuffle(order)
        keep = sorted(order[:shots]) if shots else range(len(rows))
        out[t] = [rows[i] for i in keep]
    return out


class MetaSampler:
    """Endless iterator of episodes (METHODS §2.9, steps 1–2) from per-task pools {task: [(input_ids, labels)]}.

    Episode `step` draws n tasks, then support + query distinct examples of each, from random.Random(seed, step):
    the state is the step counter. Under DDP every rank draws the same episode and keeps every world_size-th task;
    `num_tasks` stays n, so summing the ranks' gradients gives the episode mean.
    """

    def __init__(self, encoded_by_task, cfg: MetaConfig, seed=0, rank=0, world_size=1, pad_id=0):
        if not encoded_by_task:
            raise ValueError("no tasks to sample episodes from")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tasks = sorted(encoded_by_task)
        self.data = [encoded_by_task[t] for t in self.tasks]
        self.support, self.query = int(cfg.support), int(cfg.query)
        need = self.support + self.query
        small = [f"{t} ({len(rows)})" for t, rows in zip(self.tasks, self.data) if len(rows) < need]
        if small:
            raise ValueError(f"MeTA-LoRA needs --meta-support + --meta-query = {need} examples of every task for "
                             f"disjoint support and query sets; too few in: {', '.join(small)}. Lower those or "
                             "raise --shots")
        self.n = min(int(cfg.tasks), len(self.tasks))
        if world_size > self.n:
            raise ValueError(f"{world_size} processes need at least one task each, but an episode has {self.n}; "
                             "raise --meta-tasks or use fewer processes")
        self.seed, self.rank, self.world_size, self.pad_id = seed, rank, world_size, pad_id
        self.step = 0

    def plan(self, step):
        """[(task id, support indices, query indices)] of episode `step`, the same on every rank."""
        rng = random.Random(f"{self.seed}/meta/{step}")
        chosen = sorted(rng.sample(range(len(self.tasks)), self.n))
        out = []
        for t in chosen:
            idx = rng.sample(range(len(self.data[t])), self.support + self.query)  # distinct: S ∩ Q = ∅
            out.append((t, idx[:self.support], idx[self.support:]))
        return out

    def batch(self, t, idx):
        ids, mask, labels = pad_right([self.data[t][i][0] for i in idx], [self.data[t][i][1] for i in idx],
                                      self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "task_ids": torch.full((len(idx),), t, dtype=torch.long)}

    def __iter__(self):
        return self

    def __next__(self):
        mine = self.plan(self.step)[self.rank::self.world_size]
        self.step += 1
        return {"num_tasks": self.n,
                "tasks": [{"task": self.tasks[t], "task_id": t, "support": self.batch(t, s), "query": self.batch(t, q),
                           "support_idx": s, "query_idx": q} for t, s, q in mine]}

    def state_dict(self):
        """Position in the stream (JSON-serialisable); the draws derive from the seed and the step."""
        return {"tasks": list(self.tasks), "seed": self.seed, "n": self.n, "support": self.support,
                "query": self.query, "world_size": self.world_size, "step": self.step}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("tasks", "seed", "n", "support", "query", "world_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"meta sampler state has {key}={state.get(key)!r} but this sampler has "
                                 f"{mine[key]!r}: resume with the same tasks, seed, --meta-* sizes and world size")
        self.step = int(state["step"])


def answer_loss(model, params, batch, autocast=False):
    """Answer-only token-mean cross-entropy (METHODS §5.1) with the trainable tensors replaced by `params`."""
    device = next(iter(params.values())).device
    at, targets = answer_positions(batch["labels"])  # on the host batch: flat indices and right padding need no sync
    b = {k: v.to(device) for k, v in {**batch, "at": logit_indices(at), "targets": targets}.items()}
    with adapter_context(model, task_ids=b["task_ids"]), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = functional_call(model, params, (b["input_ids"], b["attention_mask"]),
                                 {"logits_at": b["at"], "right_padded": True})  # MetaSampler pads on the right
    targets = b["targets"]
    # at least fp32, as train.py (bf16 logits are coarse); float64 stays float64 (the finite-difference tests)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)


def adapt(model, params, support, cfg: MetaConfig, loss_fn=answer_loss, create_graph=False):
    """Phase I: θ_i ← θ_i − α·∇L_S(θ_i), k times, as new tensors -> (θ_i, support loss before the first step).
    First order: θ_i is a fresh leaf, detached from θ; second order (create_graph): it keeps its graph to θ."""
    fast, first = params, None
    for k in range(cfg.inner_steps):
        loss = loss_fn(model, fast, support)
        first = loss.item() if k == 0 else first
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)
        with torch.set_grad_enabled(create_graph):
            fast = {n: w - cfg.inner_lr * g for (n, w), g in zip(fast.items(), grads)}
        if not create_graph:
            fast = {n: w.requires_grad_() for n, w in fast.items()}
    return fast, first


def meta_step(model, episode, cfg: MetaConfig, loss_fn=answer_loss, scale=1.0):
    """θ.grad += scale · agg_i g_i for one episode, as a backward would (the caller clips and steps its optimizer).
    Returns the mean query and support losses and the token counts for tok/s and MFU."""
    if getattr(model, "gradient_checkpointing", False):
        raise ValueError("MeTA-LoRA cannot use gradient checkpointing: its recompute would see the shared adapter, "
                         "not the adapted copy; drop --grad-ckpt")
    shared = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not shared:
        raise ValueError("the model has no trainable tensors: apply_adapter(model, ...) first")
    second = cfg.order == 2 and cfg.inner_steps > 0
    weight = scale / episode["num_tasks"] if cfg.agg == "mean" else scale
    query_losses, support_losses, tokens, tokens_sq, logits = [], [], 0, 0, 0
    # second order differentiates a backward; the fused attention kernels have no derivative of their backward
    with sdpa_kernel([SDPBackend.MATH]) if second else nullcontext():
        for item in episode["tasks"]:
            fast, support_loss = adapt(model, shared, item["support"], cfg, loss_fn, create_graph=second)
            loss = loss_fn(model, fast, item["query"])
            # Phase II: ∇_θ through the inner steps (second order) or ∇ at θ_i, applied to θ (first order)
            grads = torch.autograd.grad(loss, list((shared if second else fast).values()))
            for p, g in zip(shared.values(), grads):
                if p.grad is None:
                    p.grad = weight * g
                else:
                    p.grad.add_(g, alpha=weight)
            query_losses.append(loss.item())
            if support_loss is not None:
                support_losses.append(support_loss)
            for part, times in (("support", cfg.inner_steps), ("query", 1)):
                lengths = item[part]["attention_mask"].sum(1)
                tokens += times * int(lengths.sum())
                tokens_sq += times * int((lengths ** 2).sum())
                logits += times * int((item[part]["labels"] != IGNORE_INDEX).sum())
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"loss": mean(query_losses), "support_loss": mean(support_losses), "tokens": tokens,
            "tokens_sq": tokens_sq, "logits": logits}
