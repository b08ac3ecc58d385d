"""Multi-task LoRA fine-tuning: one plain loop for every adapter, Align-LoRA's loss included.

    python train.py                                   # Align-LoRA on smollm2-135m + the builtin suite (CPU, minutes)
    python train.py --adapter align --rank 32 --model qwen2.5-0.5b --data commonsense
    torchrun --nproc_per_node 2 train.py ...          # DistributedDataParallel, task balance kept per rank

Every micro-batch holds `--batch-per-task` examples of every task, so L = L_LM + λ·L_align (METHODS §2.10, §3.7)
is computed per micro-batch and back-propagated in one backward. Only answer positions get logits: a 152k vocabulary
makes full logits the largest tensor of a step. The learning rate is a function of the step, so a resumed run
continues the same loss curve. Writes out/<run>/: config.json, log.jsonl, checkpoint/, adapter/, peft/, results.json.
"""

import nanoalign  # before torch: it sets OMP_WAIT_POLICY (nanoalign/__init__.py)

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoalign.adapters import adapter_context
from nanoalign.align import MMD_MAX_ROWS, alignment_loss
from nanoalign.data import IGNORE_INDEX, answer_positions, length_groups, logit_indices
from nanoalign.meta import MetaConfig, answer_loss, meta_step


def opt(default, help):
    """A TrainConfig field with its --help text (the launcher turns every field into a flag)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Training options; every field is a kebab-case flag (`max_steps` -> `--max-steps`).

    Adapter defaults follow the Align-LoRA code and paper (METHODS §2.1, §2.10): rank 8, α=32, dropout 0.1 on
    gate/up/down, AdamW without weight decay, symmetric KL with λ=0.1. The schedule is scaled down so the default run
    fits a CPU (short runs favour more, smaller steps at a high lr); the paper's recipe is
    --lr 2e-4 --batch-per-task 2 --grad-accum 5 --max-steps 2000.
    """
    # model and adapter
    model: str = opt("smollm2-135m", "alias, local directory or HF repo id")
    adapter: str = opt("auto", "adapter kind (auto: align; lora with --trainer meta)")
    rank: int = opt(8, "adapter rank r")
    alpha: float = opt(32.0, "scaling numerator: s = alpha / r")
    heads: int = opt(3, "multi-head adapters: number of B heads (multilora: number of A/B pairs)")
    targets: str = opt("gate_proj,up_proj,down_proj", "linear layers to adapt, comma separated")
    dropout: float = opt(0.1, "adapter dropout rate")
    adapter_options: str = opt("", "more options of the adapter's class (nanoalign/adapters.py) as key=value, comma "
                               "separated, e.g. rlora: random_init=false,gamma=16")
    # data
    data: str = opt("builtin", "suite (builtin, glue, commonsense), comma list of tasks, or a normalised .jsonl file")
    tasks: str = opt("", "subset of the tasks of --data, comma separated")
    data_dir: str = opt("data", "where data/prepare.py wrote <suite>/<task>-<split>.jsonl")
    format: str = opt("label", "prompt format: the paper's label words / numbered options, or lm-evaluation-harness's "
                      "cloze (the answer is the correct option's text; score it with --eval-mode cloze)")
    max_per_task: int = opt(0, "training examples per task (0: all)")
    shots: int = opt(0, "keep K training examples per task (drawn with --pool-seed; the 16 are among the 64), for "
                     "either trainer (0: all)")
    pool_seed: int = opt(0, "seed of the --max-per-task training subsample and the --eval-max test subsample (apart "
                         "from --seed, so that seeds change init, dropout and data order, not the data)")
    seq_len: int = opt(256, "max tokens per example (the prompt is cut from the left; an example whose answer "
                       "does not fit is skipped, with a note)")
    # optimisation
    max_steps: int = opt(100, "optimizer steps (the cosine schedule ends here)")
    stop_at: int = opt(0, "save a checkpoint and exit after this step, as if interrupted (0: run to --max-steps)")
    batch_per_task: int = opt(1, "examples of EVERY task in each micro-batch (per rank)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-3, "peak learning rate")
    warmup: int = opt(10, "linear warmup steps, then cosine decay to 10%% of --lr")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    # the trainer: task-balanced micro-batches, or MeTA-LoRA's episodes (METHODS §2.9, nanoalign/meta.py)
    trainer: str = opt("standard", "standard: task-balanced micro-batches; meta: MeTA-LoRA (two-stage MAML-style "
                       "episodes on a plain LoRA)")
    meta_tasks: int = opt(MetaConfig.tasks, "MeTA-LoRA: tasks per episode n (capped at the number of tasks)")
    meta_support: int = opt(MetaConfig.support, "MeTA-LoRA: support examples per task and episode")
    meta_query: int = opt(MetaConfig.query, "MeTA-LoRA: query examples per task and episode (disjoint from support)")
    meta_inner_steps: int = opt(MetaConfig.inner_steps, "MeTA-LoRA: inner SGD steps k on the support batch (0: "
                                "multi-task LoRA on the query batches)")
    meta_inner_lr: float = opt(MetaConfig.inner_lr, "MeTA-LoRA: inner SGD learning rate α")
    meta_agg: str = opt(MetaConfig.agg, "MeTA-LoRA: aggregate the query gradients over tasks")
    meta_order: int = opt(MetaConfig.order, "MeTA-LoRA: 1 first order (FOMAML), 2 through the inner steps")
    # alignment (METHODS §3)
    align_loss: str = opt("kl", "alignment loss: symmetric KL (A-LoRA-K) or multi-kernel MMD (A-LoRA-M)")
    align_lambda: float = opt(0.1, "λ in L = L_LM + λ·L_align")
    align_any: bool = opt(False, "add the alignment loss to a non-align adapter too (METHODS §7 claim 9)")
    align_tokens: str = opt("all", "tokens whose A-outputs are aligned: every real token (METHODS §3.7) or the "
                            "answer tokens")
    align_position_wise: bool = opt(False, "per-position statistics, as the released code (METHODS §3.3)")
    mmd_rows: int = opt(MMD_MAX_ROWS, "A-LoRA-M: rows (tokens) per task the MMD compares, evenly spaced (the kernel "
                        "grows with their square; 0: every row, the exact estimator)")
    # system
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "base weights: auto (bf16 on CUDA, fp32 on CPU)")
    autocast: str = opt("auto", "bf16 autocast: auto (on CUDA only), bf16 (also on CPU), off")
    grad_ckpt: bool = opt(False, "gradient checkpointing per decoder block")
    length_groups: int = opt(4, "at most this many forwards per micro-batch, rows grouped by length so that each "
                             "group is padded to its own longest row (1: one padded block, as with --grad-ckpt/DDP)")
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(1337, "seed of adapter init, dropout and data order")
    # output and evaluation
    out: str = opt("out", "output root; the run writes to <out>/<run-name>")
    run_name: str = opt("", "the run's directory name (default: <model>-<adapter>-r<rank>)")
    resume: bool = opt(False, "continue from <out>/<run>/checkpoint")
    log_every: int = opt(1, "print a log line every this many steps (log.jsonl gets every step)")
    ckpt_every: int = opt(50, "checkpoint every this many steps")
    eval_every: int = opt(0, "evaluate every this many steps (0: only before and after training)")
    eval_max: int = opt(40, "test examples per task for the evaluations (0: no evaluation)")
    eval_mode: str = opt("generate", "greedy generation + answer extraction, option log-likelihood (label "
                         "format) or lm-evaluation-harness's cloze scoring")
    eval_tokens: int = opt(8, "max new tokens per answer in generate mode")
    eval_data: str = opt("", "held-out data for the evaluations (default: the test split of --data)")


def aligns(cfg):
    """Whether the alignment loss is on: the align adapter, or any adapter with --align-any."""
    return cfg.adapter == "align" or cfg.align_any


def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer(cfg, params, device):
    """AdamW on the adapter's tensors only (the base is frozen), fp32 state; the fused kernel on CUDA."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def to_device(t, device):
    """A host tensor on `device`, on CUDA pinned and non-blocking: the copy queues behind launched kernels."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- the loss of one micro-batch

def micro_batch_backward(fwd, model, batch, cfg, align_on, num_tasks, autocast, device, align_fn=alignment_loss):
    """Backward of L = (CE over answer tokens (METHODS §5.1) + λ·L_align over all rows (§3.5)) / grad_accum.
    Returns (ce, align) as device tensors, read by the host once per step, and the token counts.

    The rows run as length groups, one forward each, but CE and L_align are of the whole micro-batch, so the backward
    is one. With checkpointing the backward re-runs the adapters and must happen inside the adapter context: one
    group. Right padding (the batcher's) is what lets `[:, :T]` trim a group and the fast forward skip the mask."""
    lengths = batch["attention_mask"].sum(1).tolist()
    one = cfg.grad_ckpt or dist.is_initialized()  # DDP: one forward per backward, as its reducer expects
    groups = [list(range(len(lengths)))] if one else length_groups(lengths, cfg.length_groups)
    ce_sum, n_targets, parts = 0.0, 0, []
    for rows in groups:
        T = max(lengths[i] for i in rows)
        ids, mask, labels = (batch[k][rows, :T] for k in ("input_ids", "attention_mask", "labels"))
        at, targets = answer_positions(labels)  # logits only where the next token is labelled
        n_targets += targets.numel()
        ids, mask, labels, idx, targets, task_ids = (to_device(t, device) for t in (
            ids, mask, labels, logit_indices(at), targets, batch["task_ids"][rows]))
        with adapter_context(model, task_ids=task_ids, collect=align_on) as actx:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = fwd(ids, mask, logits_at=idx, right_padded=True)
            ce_sum = ce_sum + F.cross_entropy(logits.float(), targets, reduction="sum")
            parts.append((actx.a_outputs, mask if cfg.align_tokens == "all" else labels != IGNORE_INDEX, task_ids))
            if len(groups) == 1:  # inside the context: checkpointed blocks re-run the adapters in the backward
                ce, la = alignment_objective(ce_sum / n_targets, parts, cfg, align_on, num_tasks, align_fn)
                ((ce + cfg.align_lambda * la) / cfg.grad_accum).backward()
    if len(groups) > 1:
        ce, la = alignment_objective(ce_sum / n_targets, parts, cfg, align_on, num_tasks, align_fn)
        ((ce + cfg.align_lambda * la) / cfg.grad_accum).backward()
    return ce.detach(), la.detach(), int(sum(lengths)), float(sum(t * t for t in lengths)), n_targets


def alignment_objective(ce, parts, cfg, align_on, num_tasks, align_fn=alignment_loss):
    """(CE, L_align) of a micro-batch from its groups' (A-outputs, token mask, task ids); L_align is 0 when off."""
    if not align_on:
        return ce, torch.zeros((), device=ce.device)
    T = max(mask.shape[1] for _, mask, _ in parts)
    a_outputs = {name: torch.cat([F.pad(a[name], (0, 0, 0, T - a[name].shape[1])) for a, _, _ in parts])
                 for name in parts[0][0]}
    token_mask = torch.cat([F.pad(mask, (0, T - mask.shape[1])) for _, mask, _ in parts])
    task_ids = torch.cat([t for _, _, t in parts])
    kw = {"max_rows": cfg.mmd_rows or None} if cfg.align_loss == "mmd" else {}
    return ce, align_fn(a_outputs, token_mask, task_ids, kind=cfg.align_loss, position_wise=cfg.align_position_wise,
                        num_tasks=num_tasks, **kw)


# ----------------------------------------------------------------------------- the optimizer step and the loop

@dataclass
class Run:
    """What the loop trains and where it stands; built by the launcher (model + adapter, optimizer, resume)."""
    model: torch.nn.Module
    fwd: torch.nn.Module  # the model as the step calls it: compiled and/or wrapped by DDP
    opt: torch.optim.Optimizer
    batcher: object  # nanoalign.data.BalancedBatcher, or MeTA-LoRA's nanoalign.meta.MetaSampler
    device: torch.device
    autocast: bool = False  # bf16 autocast for the matmuls
    world: int = 1  # processes (DDP)
    step: int = 0  # optimizer steps done
    align_fn: object = alignment_loss  # nanoalign.align.alignment_loss, or a fast form equal to it
    trainable: list = field(init=False)

    def __post_init__(self):
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]


class NotFinite(FloatingPointError):
    """A step whose loss, gradient norm or updated weights are not finite (nothing of it may be written)."""


def train_step(cfg: TrainConfig, run: Run, stop: dict) -> dict:
    """One optimizer step: --grad-accum micro-batches, clipping, AdamW, then the step's one host sync. The stop flag
    travels in the same all-reduce, so every process stops after the same step. Raises NotFinite."""
    t0 = time.perf_counter()
    lr = lr_at(run.step, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    ce_sum = align_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    counts = [0.0, 0.0, 0.0]  # real tokens, Σ T², logit positions: for tok/s and MFU
    for micro in range(cfg.grad_accum):
        b = next(run.batcher)
        if cfg.trainer == "meta":  # k inner SGD steps per task; the query gradients are left in .grad (meta.py)
            st = meta_step(run.model, b, MetaConfig.from_flags(cfg), partial(answer_loss, autocast=run.autocast),
                           scale=1 / cfg.grad_accum)
            ce_sum, n = ce_sum + st["loss"], (st["tokens"], st["tokens_sq"], st["logits"])
        else:  # DDP all-reduces the gradients in the last micro-batch's backward only
            with run.fwd.no_sync() if run.world > 1 and micro < cfg.grad_accum - 1 else nullcontext():
                ce, la, *n = micro_batch_backward(run.fwd, run.model, b, cfg, aligns(cfg), len(run.batcher.tasks),
                                                  run.autocast, run.device, run.align_fn)
            ce_sum, align_sum = ce_sum + ce.double(), align_sum + la.double()
        counts = [c + x for c, x in zip(counts, n)]
    if cfg.trainer == "meta" and run.world > 1:  # functional calls bypass DDP's hooks: sum the ranks' gradients
        for p in run.trainable:                  # (each rank's share is already divided by the episode's n)
            dist.all_reduce(p.grad)
    host = to_device(torch.tensor([*counts, float(stop["flag"])], dtype=torch.float64), run.device)
    summed = torch.cat([ce_sum[None], align_sum[None], host])
    if run.world > 1:
        dist.all_reduce(summed)
    # clip_grad_norm_ also measures the norm (inf: no clipping), so NaN gradients are caught too
    gnorm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip or float("inf"))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # one norm over all adapter tensors: a NaN or inf anywhere makes it non-finite
        finite = torch.nn.utils.get_total_norm(run.trainable).isfinite()
    ce_sum, align_sum, tokens, tokens_sq, logits, stops, gnorm, finite = torch.cat(
        [summed, gnorm.double()[None], finite.double()[None]]).tolist()  # the step's one host sync
    stop["flag"] = stops > 0
    ce, align = ce_sum / (cfg.grad_accum * run.world), align_sum / (cfg.grad_accum * run.world)
    loss = ce + cfg.align_lambda * align if aligns(cfg) else ce
    if not (math.isfinite(loss) and math.isfinite(gnorm) and finite):
        what = (f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm}"
                if not math.isfinite(gnorm) else "the update made adapter weights non-finite")
        raise NotFinite(f"{what} at step {run.step + 1} (ce {ce:.4g}, align {align:.4g})")
    run.step += 1
    return {"step": run.step, "loss": loss, "ce": ce, "align": align, "lr": lr, "grad_norm": gnorm,
            "tokens": int(tokens), "tokens_sq": tokens_sq, "logits": logits, "seconds": time.perf_counter() - t0}


def train(cfg: TrainConfig, run: Run, hooks) -> bool:
    """The loop from run.step to --max-steps; `hooks` log, checkpoint, evaluate. Returns whether it got there."""
    run.model.train()
    while run.step < cfg.max_steps:
        hooks.log(train_step(cfg, run, hooks.stop))
        more = run.step < cfg.max_steps
        halt = more and (hooks.stop["flag"] or (cfg.stop_at and run.step >= cfg.stop_at))
        if halt or (more and run.step % cfg.ckpt_every == 0):
            hooks.checkpoint()
        if halt:
            hooks.stopped()
            return False
        if more and cfg.eval_every and run.step % cfg.eval_every == 0:
            hooks.evaluate()
    return True


if __name__ == "__main__":
    from nanoalign.plumbing.launch import main
    main(train_py=sys.modules[__name__])
