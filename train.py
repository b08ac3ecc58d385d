"""Multi-task LoRA fine-tuning: one plain loop for every adapter, Align-LoRA's loss included.

    python train.py                                   # Align-LoRA on smollm2-135m + the builtin suite (CPU, minutes)
    python train.py --adapter align --rank 32 --model qwen2.5-0.5b --data commonsense
    torchrun --nproc_per_node 2 train.py ...          # DistributedDataParallel, task balance kept per rank

Every micro-batch holds `--batch-per-task` examples of every task (task ids travel with the batch), so the
Align-LoRA objective L = L_LM + λ·L_align (METHODS §2.10, §3.7) is computed per micro-batch and back-propagated with
the LM loss in the same backward. Only answer positions get logits (a 152k vocabulary makes full logits the largest
tensor of a step). The learning rate is a function of the step, so a run resumed from a checkpoint (adapter,
optimizer, RNG states, data position) continues the exact same loss curve. A step whose loss, gradient norm or
updated weights are not finite stops the run before anything of it is written.

This file is the training step and the loop. Everything around them — the command line and its checks, the run
directory, checkpoints and --resume, Ctrl-C, processes, the log line, evaluation and the saved adapter — is
nanoalign/plumbing/launch.py, which builds a `Run` and calls `train`.

Writes out/<run>/: config.json, log.jsonl (one record per step), checkpoint/, adapter/ (nanoalign format),
peft/ (when the adapter is a plain LoRA at inference) and results.json (per-task accuracy before and after).
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
from nanoalign.data import IGNORE_INDEX, answer_positions, length_groups
from nanoalign.meta import MetaConfig, answer_loss, meta_step
from nanoalign.model import logit_indices


@dataclass
class TrainConfig:
    """Training options; every field is a kebab-case flag (`max_steps` -> `--max-steps`, help texts in the launcher).

    Adapter defaults follow the Align-LoRA code and paper (METHODS §2.1, §2.10): rank 8, α=32, dropout 0.1 on
    gate/up/down, AdamW without weight decay, symmetric-KL alignment with λ=0.1 (the paper's best; mean over task
    pairs and modules, added on every micro-batch). The schedule is scaled down so that `python train.py` trains
    SmolLM2-135M on the 5 builtin tasks in minutes on a CPU: 100 steps of 1 example per task at a high learning
    rate (more, smaller steps beat fewer, larger ones in this short regime), 40 test examples per task for the
    before/after accuracy, at most 8 generated tokens (answers are one word). The paper's recipe (lr 2e-4,
    effective batch 50, one epoch) is for GPUs: --lr 2e-4 --batch-per-task 2 --grad-accum 5 --max-steps 2000.
    """
    # model and adapter
    model: str = "smollm2-135m"
    adapter: str = "auto"             # auto: align, or the plain lora that --trainer meta trains
    rank: int = 8
    alpha: float = 32.0               # s = alpha / r
    heads: int = 3                    # multi-head adapters: B heads (multilora: A/B pairs)
    targets: str = "gate_proj,up_proj,down_proj"
    dropout: float = 0.1
    adapter_options: str = ""         # key=value options of the adapter's class
    # data
    data: str = "builtin"             # suite, comma list of tasks, or a .jsonl file
    tasks: str = ""                   # subset of the tasks of --data
    data_dir: str = "data"
    format: str = "label"             # label words / numbered options, or lm-evaluation-harness's cloze
    max_per_task: int = 0             # training examples per task (0: all)
    shots: int = 0                    # keep K training examples per task (0: all)
    pool_seed: int = 0                # seed of the subsamples (data), apart from --seed (init, dropout, order)
    seq_len: int = 256
    # optimisation
    max_steps: int = 100
    stop_at: int = 0                  # checkpoint and exit after this step, as if interrupted
    batch_per_task: int = 1           # examples of EVERY task in each micro-batch (per rank)
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: int = 10                  # linear warmup, then cosine decay to 10% of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0            # 0: no clipping
    # the trainer: task-balanced micro-batches, or MeTA-LoRA's episodes (METHODS §2.9, nanoalign/meta.py)
    trainer: str = "standard"
    meta_tasks: int = MetaConfig.tasks
    meta_support: int = MetaConfig.support
    meta_query: int = MetaConfig.query
    meta_inner_steps: int = MetaConfig.inner_steps
    meta_inner_lr: float = MetaConfig.inner_lr
    meta_agg: str = MetaConfig.agg
    meta_order: int = MetaConfig.order
    # alignment (METHODS §3)
    align_loss: str = "kl"            # kl (A-LoRA-K) or mmd (A-LoRA-M)
    align_lambda: float = 0.1         # λ in L = L_LM + λ·L_align
    align_any: bool = False           # the alignment loss on a non-align adapter too (METHODS §7 claim 9)
    align_tokens: str = "all"         # align every real token's A-output (METHODS §3.7), or the answer's
    align_position_wise: bool = False  # per-position statistics, as the released code (METHODS §3.3)
    mmd_rows: int = MMD_MAX_ROWS      # rows per task the MMD compares (0: all, the exact estimator)
    # system
    device: str = "auto"
    dtype: str = "auto"               # base weights: bf16 on CUDA, fp32 on CPU
    autocast: str = "auto"            # bf16 autocast on CUDA
    grad_ckpt: bool = False           # gradient checkpointing per decoder block
    length_groups: int = 4            # at most this many forwards per micro-batch (rows grouped by length)
    compile: bool = False
    seed: int = 1337                  # adapter init, dropout and data order
    # output and evaluation
    out: str = "out"
    run_name: str = ""                # default <model>-<adapter>-r<rank>
    resume: bool = False
    log_every: int = 1
    ckpt_every: int = 50
    eval_every: int = 0               # 0: only before and after training
    eval_max: int = 40                # test examples per task (0: no evaluation)
    eval_mode: str = "generate"
    eval_tokens: int = 8
    eval_data: str = ""               # held-out data (default: the test split of --data)


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
    """A host tensor on `device`; on CUDA through pinned memory and without blocking: the copy queues behind the
    kernels already launched instead of waiting for them."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- the loss of one micro-batch

def micro_batch_backward(fwd, model, batch, cfg, align_on, num_tasks, autocast, device, align_fn=alignment_loss):
    """Forward and backward of one task-balanced micro-batch: L = CE over its answer tokens (+ λ·L_align over all
    its rows), divided by --grad-accum. Returns (ce, align loss) as 0-dim tensors on the device (read by the host
    once per step, not per micro-batch), and (real tokens, Σ_rows T_row², logit positions) as Python numbers.

    Without gradient checkpointing the rows run as length groups (`length_groups`), one forward each; the CE is
    summed over the groups' answer tokens and divided by their total, and the alignment loss sees every row's
    A-outputs at once (right-padded to one length, the padding masked out), so L is the loss of the whole micro-batch
    and the backward is one. With checkpointing the blocks re-run the adapters during the backward, which must then
    happen inside the adapter context: one group (and under DDP, whose reducer expects one forward per backward).
    The forward needs no host sync: the answer positions become flat indices (`logit_indices`) on the host, the rows
    go to the device by `to_device`, and `right_padded=True` is what the batcher guarantees (BalancedBatcher pads on
    the right; slicing a group to its longest row, `[:, :T]`, relies on it too)."""
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
    """One optimizer step: --grad-accum micro-batches (forward + backward), the losses summed over processes,
    gradient clipping, the AdamW update, and one read of the results by the host, after the update: the losses, the
    gradient norm and whether the weights are still finite. `stop["flag"]` (a signal, set by the launcher) travels in
    the same sum, so every process stops after the same step. Returns the step's record; raises NotFinite."""
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
    """The loop, from run.step to --max-steps. `hooks` (the launcher's) writes what the loop decides: `log(record)`
    every step, `checkpoint()` every --ckpt-every steps, `evaluate()` every --eval-every steps, and `stopped()` when
    a signal (hooks.stop["flag"]) or --stop-at ends the run early, after a checkpoint. Returns whether it reached
    --max-steps (the launcher then saves the adapter and evaluates it)."""
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
