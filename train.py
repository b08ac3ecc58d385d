"""Multi-task LoRA fine-tuning: one plain loop for every adapter, Align-LoRA's loss included.

    python train.py                                   # Align-LoRA on smollm2-135m + the builtin suite (CPU, minutes)
    python train.py --adapter align --rank 32 --model qwen2.5-0.5b --data commonsense
    torchrun --nproc_per_node 2 train.py ...          # DistributedDataParallel, task balance kept per rank

Every micro-batch holds `--batch-per-task` examples of every task (task ids travel with the batch), so the
Align-LoRA objective L = L_LM + λ·L_align (METHODS §2.10, §3.7) is computed per micro-batch and back-propagated with
the LM loss in the same backward. Only answer positions get logits (a 152k vocabulary makes full logits the largest
tensor of a step). Checkpoints hold adapter, optimizer, RNG states and data position (the learning rate is a
function of the step), written atomically and synced to disk, so `--resume` continues the exact same loss curve
(bitwise on CPU), also after a torn last log line or from checkpoint.old when the live checkpoint is damaged;
Ctrl-C saves one and exits. A step whose loss, gradient norm or updated weights are not finite stops the run before
anything of it is written, so the last checkpoint is always a good one. A run directory that holds an earlier run is
continued with --resume or started again with --overwrite, never replaced by accident.

`train()` reads top to bottom as the stages of a run: setup (device, processes, seed, dtype, the run directory),
data (tasks, tokenisation, the batcher), model + adapter (evaluation before, optimizer, resume), then per step
`train_step` (the part a GPU profile points at: micro-batches, all-reduce, clipping, update, one host read), the log
and checkpoints, and `finish` (final save and evaluation). Under DDP every rank evaluates a share of the examples.

Writes out/<run>/: config.json, log.jsonl (one record per step), checkpoint/, adapter/ (nanoalign format),
peft/ (when the adapter is a plain LoRA at inference) and results.json (per-task accuracy before and after).
"""

import nanoalign  # before torch: it sets OMP_WAIT_POLICY (nanoalign/__init__.py)
import nanoalign.plumbing

import argparse
import dataclasses
from functools import partial
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from nanoalign.adapters import (KINDS, MAX_ALPHA, adapter_context, apply_adapter, check_options, count_trainable,
                                export_peft_dirs, save_adapter)
from nanoalign.align import MMD_MAX_ROWS
from nanoalign.plumbing.checkpoint import (Checkpoint, all_finite, check_fresh_start, clear_run_state, continue_run_dir,
                                  find_checkpoint, load_checkpoint, read_log, save_checkpoint)
from nanoalign.data import IGNORE_INDEX, BalancedBatcher, answer_positions, encode_fitting, load_tasks
from nanoalign.evaluate import (MODES, accuracies, diagnostics_table, evaluate, generation_fallback, markdown_table,
                                task_result, without_records)
from nanoalign.plumbing.hub import HubError
from nanoalign.meta import MetaConfig, MetaSampler, answer_loss, limit_shots, meta_step
from nanoalign.plumbing.fast import alignment_loss, install, logit_indices
from nanoalign.plumbing.system import (base_dtype, flops_coefficients, os_error_line, peak_flops, peak_memory_mib, pick_device,
                              use_autocast, write_atomic)
from nanoalign.tasks import FORMATS


def opt(default, help, choices=None):
    """A TrainConfig field with its --help text."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Training options; every field is a kebab-case flag (`max_steps` -> `--max-steps`).

    Adapter defaults follow the Align-LoRA code and paper (METHODS §2.1, §2.10): rank 8, α=32, dropout 0.1 on
    gate/up/down, AdamW without weight decay, symmetric-KL alignment with λ=0.1 (the paper's best; mean over task
    pairs and modules, added on every micro-batch). The schedule is scaled down so that `python train.py` trains
    SmolLM2-135M on the 5 builtin tasks in under 10 minutes on 2 shared CPU cores: a step of 1 example per task
    (~190 tokens) takes 2.4-5 s there depending on the other load, so 100 steps at a high learning rate (2e-3,
    10 warmup steps, cosine to 10%) and 40 test examples per task for the before/after accuracy, generating at most
    8 tokens (answers are one word). Measured: 6.4-6.7 min wall, average accuracy 24% -> 75.5%. At the same compute,
    2 examples per task x 60 steps reached 67%: more, smaller steps win in this short regime.
    The paper's recipe (lr 2e-4, effective batch 50, one epoch) is for GPUs, e.g. --lr 2e-4 --batch-per-task 2
    --grad-accum 5 --max-steps 2000.
    """
    # model and adapter
    model: str = opt("smollm2-135m", "alias, local directory or HF repo id")
    adapter: str = opt("auto", "adapter kind (auto: align; lora with --trainer meta)", choices=["auto", *KINDS])
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
                      "cloze (the answer is the correct option's text; score it with --eval-mode cloze)",
                      choices=list(FORMATS))
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
                       "episodes on a plain LoRA)", choices=["standard", "meta"])
    meta_tasks: int = opt(MetaConfig.tasks, "MeTA-LoRA: tasks per episode n (capped at the number of tasks)")
    meta_support: int = opt(MetaConfig.support, "MeTA-LoRA: support examples per task and episode")
    meta_query: int = opt(MetaConfig.query, "MeTA-LoRA: query examples per task and episode (disjoint from support)")
    meta_inner_steps: int = opt(MetaConfig.inner_steps, "MeTA-LoRA: inner SGD steps k on the support batch (0: "
                                "multi-task LoRA on the query batches)")
    meta_inner_lr: float = opt(MetaConfig.inner_lr, "MeTA-LoRA: inner SGD learning rate α")
    meta_agg: str = opt(MetaConfig.agg, "MeTA-LoRA: aggregate the query gradients over tasks",
                        choices=["mean", "sum"])
    meta_order: int = opt(MetaConfig.order, "MeTA-LoRA: 1 first order (FOMAML), 2 through the inner steps",
                          choices=[1, 2])
    # alignment (METHODS §3)
    align_loss: str = opt("kl", "alignment loss: symmetric KL (A-LoRA-K) or multi-kernel MMD (A-LoRA-M)",
                          choices=["kl", "mmd"])
    align_lambda: float = opt(0.1, "λ in L = L_LM + λ·L_align")
    align_any: bool = opt(False, "add the alignment loss to a non-align adapter too (METHODS §7 claim 9)")
    align_tokens: str = opt("all", "tokens whose A-outputs are aligned: every real token (METHODS §3.7) or the "
                            "answer tokens", choices=["all", "answer"])
    align_position_wise: bool = opt(False, "per-position statistics, as the released code (METHODS §3.3)")
    mmd_rows: int = opt(MMD_MAX_ROWS, "A-LoRA-M: rows (tokens) per task the MMD compares, evenly spaced (the kernel "
                        "grows with their square; 0: every row, the exact estimator)")
    # system
    device: str = opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "base weights: auto (bf16 on CUDA, fp32 on CPU)", choices=["auto", "float32", "bfloat16"])
    autocast: str = opt("auto", "bf16 autocast: auto (on CUDA only), bf16 (also on CPU), off",
                        choices=["auto", "bf16", "off"])
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
                         "format) or lm-evaluation-harness's cloze scoring", choices=list(MODES))
    eval_tokens: int = opt(8, "max new tokens per answer in generate mode")
    eval_data: str = opt("", "held-out data for the evaluations (default: the test split of --data)")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        kw = dict(default=f.default, help=f.metadata["help"])
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=f.type, choices=f.metadata["choices"])
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    p.add_argument("--overwrite", action="store_true", help="start fresh in a run directory that holds an earlier "
                   "run, deleting its checkpoints and log (without --resume or this, train.py refuses to start there)")
    return p


def parse_command(argv=None):
    """(TrainConfig, overwrite) of a command line. --overwrite is no TrainConfig field: it says what to do with the
    run directory, not what to compute (a field would enter config.json and every key derived from the config)."""
    ns = vars(make_parser().parse_args(argv))
    overwrite = ns.pop("overwrite")
    return TrainConfig(**ns), overwrite


def parse_args(argv=None) -> TrainConfig:
    """The TrainConfig of a command line (see parse_command for --overwrite)."""
    return parse_command(argv)[0]


def flag(name):
    return "--" + name.replace("_", "-")


def check_config(cfg: TrainConfig, overwrite=False):
    """Every option in range before anything is loaded or written: a non-finite or absurd number would otherwise
    show up as a NaN loss after the first update, or worse as finite garbage saved in a checkpoint."""
    positive = ["rank", "heads", "max_steps", "batch_per_task", "grad_accum", "seq_len", "log_every", "ckpt_every",
                "eval_tokens", "length_groups"]
    bad = next((f for f in positive if getattr(cfg, f) < 1), None)
    if bad:
        raise ValueError(f"{flag(bad)} must be at least 1, got {getattr(cfg, bad)}")
    bad = next((f for f in ["warmup", "max_per_task", "shots", "stop_at", "eval_every", "eval_max", "mmd_rows"]
                if getattr(cfg, f) < 0), None)
    if bad:
        raise ValueError(f"{flag(bad)} must not be negative, got {getattr(cfg, bad)}")
    bad = next((f for f in ["lr", "alpha", "dropout", "weight_decay", "grad_clip", "align_lambda"]
                if not math.isfinite(getattr(cfg, f))), None)
    if bad:
        raise ValueError(f"{flag(bad)} must be a finite number, got {getattr(cfg, bad)}")
    if not 0 < cfg.lr <= 1:
        raise ValueError(f"--lr must be in (0, 1], got {cfg.lr} (AdamW moves each weight by about the learning rate "
                         "per step; LoRA learning rates are 1e-4 to 1e-2)")
    if not 0 < cfg.alpha <= MAX_ALPHA:
        raise ValueError(f"--alpha must be in (0, {MAX_ALPHA:g}], got {cfg.alpha}")
    bad = next((f for f in ["weight_decay", "grad_clip", "align_lambda"] if getattr(cfg, f) < 0), None)
    if bad:
        raise ValueError(f"{flag(bad)} must not be negative, got {getattr(cfg, bad)}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.resume and overwrite:
        raise ValueError("--resume continues the run in its directory, --overwrite starts it again: pass one of them")
    if cfg.adapter == "auto":  # the default: Align-LoRA, or the plain LoRA that MeTA-LoRA trains
        cfg.adapter = "lora" if cfg.trainer == "meta" else "align"
    if cfg.trainer == "meta":
        MetaConfig.from_flags(cfg)  # each bad value names its --meta-* flag
        if aligns(cfg):
            raise ValueError("--trainer meta trains a plain LoRA without an alignment loss (METHODS §2.9): use "
                             "--adapter lora (or leave --adapter out) and no --align-any")
        if cfg.grad_ckpt or cfg.compile:
            raise ValueError("--trainer meta calls the model functionally (torch.func): drop --grad-ckpt and "
                             "--compile")
    check_options(cfg.adapter, parse_options(cfg.adapter_options))


def parse_options(text):
    """--adapter-options "a=1,b=false,c=mean" -> {"a": 1, "b": False, "c": "mean"}: JSON numbers and true/false where
    they parse, else the text."""
    options = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise ValueError(f"--adapter-options takes key=value pairs separated by commas, got {item!r}")
        try:
            options[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def aligns(cfg):
    """Whether the alignment loss is on: the align adapter, or any adapter with --align-any."""
    return cfg.adapter == "align" or cfg.align_any


# ----------------------------------------------------------------------------- helpers

def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def to_device(t, device):
    """A host tensor on `device`; on CUDA through pinned memory and without blocking: the copy queues behind the
    kernels already launched instead of waiting for them."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def select_tasks(by_task, subset, spec):
    """Keep the --tasks subset of what --data loaded; an unknown name is an error."""
    if not subset:
        return by_task
    unknown = [t for t in subset if t not in by_task]
    if unknown:
        raise ValueError(f"--tasks {', '.join(unknown)}: not among the tasks of --data {spec} ({', '.join(by_task)})")
    return {t: by_task[t] for t in sorted(subset)}


def load_eval_tasks(cfg, subset):
    """Held-out examples for the before/after evaluation: --eval-data, else the test split of --data."""
    if not cfg.eval_max:
        return {}
    spec = cfg.eval_data or cfg.data
    if not cfg.eval_data and (spec.endswith(".jsonl") or os.sep in spec):
        print("note: --data is a file, so there is no test split to evaluate on; pass --eval-data", file=sys.stderr)
        return {}
    tasks = load_tasks(spec, "test", data_dir=cfg.data_dir, max_per_task=cfg.eval_max, seed=cfg.pool_seed,
                       fmt=cfg.format)
    return {t: v for t, v in tasks.items() if t in subset} if subset else tasks


# ----------------------------------------------------------------------------- distributed

def setup_distributed(device):
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_sum(t, world):
    """Sum a float64 tensor over ranks (losses, token counts, the Ctrl-C flag), so every rank takes the same
    decisions; no host sync."""
    if world > 1:
        dist.all_reduce(t)
    return t


def evaluate_all_ranks(model, tok, tasks, env, **kw):
    """`evaluate` with the examples shared out over the ranks (rank r scores examples r, r + world, ...) and the
    records gathered back in their order, so every rank gets the whole result. Every rank works during an
    evaluation, and none waits inside a collective while another one evaluates alone (NCCL's watchdog kills a
    collective that waits longer than its timeout, e.g. 10 minutes)."""
    if env.world == 1:
        return evaluate(model, tok, tasks, **kw)
    shard = {t: rows[env.rank::env.world] for t, rows in tasks.items() if rows[env.rank::env.world]}
    mine = evaluate(model, tok, shard, progress=env.master, **kw)
    parts = [None] * env.world
    dist.all_gather_object(parts, {t: (r["mode"], r["records"]) for t, r in mine.items()})
    results = {}
    for t, rows in tasks.items():
        per_rank = [part.get(t, (None, [])) for part in parts]
        records = [per_rank[i % env.world][1][i // env.world] for i in range(len(rows))]
        results[t] = task_result(records, next(mode for mode, _ in per_rank if mode))
    return results


# ----------------------------------------------------------------------------- resume

MUST_MATCH = ["model", "adapter", "rank", "alpha", "heads", "adapter_options", "targets", "data", "format", "tasks",
              "max_per_task", "pool_seed", "batch_per_task", "seq_len", "seed", "length_groups", "trainer", "shots",
              "meta_tasks", "meta_support", "meta_query"]


def check_resume_config(old: dict, cfg: TrainConfig, say):
    """Same model, adapter and data stream as the checkpoint, or an error; other changes are listed."""
    def value(k, v):  # adapter options compare parsed: "x=false" is "x=False"
        return parse_options(v) if k == "adapter_options" else v

    for k in MUST_MATCH:
        if k in old and value(k, old[k]) != value(k, getattr(cfg, k)):
            raise ValueError(f"--resume: the checkpoint was trained with {flag(k)} {old[k]!r}, this run has "
                             f"{getattr(cfg, k)!r}; resume with the same setting")
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in old and k not in ("resume",) and old[k] != v and not (v != v and old[k] != old[k])]
    if changed:
        say("note: resuming with changed settings: " + ", ".join(changed))


# ----------------------------------------------------------------------------- the stages of a run

@dataclass
class Env:
    """Stage 1, setup: where and how this process runs."""
    device: torch.device
    rank: int
    world: int
    dtype: torch.dtype
    autocast: bool
    out: Path  # the run directory
    resumed: Checkpoint | None

    @property
    def master(self):
        return self.rank == 0

    def say(self, *args, **kw):
        if self.master:
            print(*args, **kw)


def setup(cfg: TrainConfig, overwrite=False) -> Env:
    """Device, processes, seed, dtype and autocast; the run directory checked before anything is loaded: the
    checkpoint to resume from, read whole, or the refusal to start fresh over an earlier run."""
    device = pick_device(cfg.device)
    rank, world, device = setup_distributed(device)
    out = Path(cfg.out) / (cfg.run_name or f"{Path(cfg.model).name}-{cfg.adapter}{'-meta' * (cfg.trainer == 'meta')}"
                                            f"-r{cfg.rank}")
    say = print if rank == 0 else (lambda *a, **k: None)
    resumed = None
    if cfg.resume:
        resumed = find_checkpoint(out / "checkpoint", say)
        check_resume_config(resumed.state["config"], cfg, say)
    else:
        check_fresh_start(out, overwrite)
    torch.manual_seed(cfg.seed)
    return Env(device, rank, world, base_dtype(device, cfg.dtype), use_autocast(device, cfg.autocast), out, resumed)


@dataclass
class Data:
    """Stage 2, data: the training tasks tokenised once into the task-balanced batcher, and the held-out tasks."""
    names: list  # sorted task names: task ids are their positions (nanoalign.data)
    tok: object
    batcher: BalancedBatcher | MetaSampler
    sizes: dict
    test_tasks: dict


def load_data(cfg: TrainConfig, env: Env) -> Data:
    """--data (the --tasks subset), tokenised; the held-out tasks; notes on what was asked but will not happen."""
    subset = sorted({t.strip() for t in cfg.tasks.split(",") if t.strip()})
    train_tasks = select_tasks(load_tasks(cfg.data, "train", data_dir=cfg.data_dir, seed=cfg.pool_seed, fmt=cfg.format,
                                          max_per_task=cfg.max_per_task or None), subset, cfg.data)
    train_tasks = limit_shots(train_tasks, cfg.shots, seed=cfg.pool_seed)  # both trainers: the same K examples
    test_tasks = load_eval_tasks(cfg, subset)
    names = sorted(train_tasks)
    tok = nanoalign.plumbing.load_tokenizer(cfg.model)
    encoded, notes = {}, []
    with tqdm(total=sum(map(len, train_tasks.values())), desc="tokenise", leave=False, disable=not env.master) as bar:
        for t in names:  # an example whose answer leaves no room for its prompt is left out, with one note
            encoded[t], skipped = encode_fitting(tok, train_tasks[t], cfg.seq_len)
            bar.update(len(train_tasks[t]))
            if not encoded[t]:
                raise ValueError(f"every {t} training example's answer is longer than --seq-len {cfg.seq_len} "
                                 "leaves room for: raise --seq-len")
            if skipped:
                notes.append(f"note: skipped {skipped} of {len(train_tasks[t])} {t} training examples whose answer "
                             f"(+ eos) leaves no room for the prompt in --seq-len {cfg.seq_len}")
    if cfg.trainer == "meta":
        batcher = MetaSampler(encoded, MetaConfig.from_flags(cfg), seed=cfg.seed, rank=env.rank,
                              world_size=env.world, pad_id=tok.pad_id)
    else:
        batcher = BalancedBatcher(encoded, per_task=cfg.batch_per_task, seed=cfg.seed, rank=env.rank,
                                  world_size=env.world, pad_id=tok.pad_id)
    if env.master:  # say what was asked but will not happen
        for note in notes:
            print(note, file=sys.stderr)
        if aligns(cfg) and len(names) == 1:
            print(f"warning: one task ({names[0]}): the alignment loss compares tasks, so it is 0 throughout and "
                  "training is plain LoRA; give --data several tasks", file=sys.stderr)
        if fallback := generation_fallback(test_tasks, cfg.eval_mode):
            print(f"note: --eval-mode {cfg.eval_mode} scores options; {', '.join(fallback)} (no options) will be "
                  "scored by generation instead", file=sys.stderr)
    return Data(names, tok, batcher, {t: len(encoded[t]) for t in names}, test_tasks)


@dataclass
class State:
    """Stage 3, model + adapter: what the step works on, and where the run stands."""
    model: torch.nn.Module
    fwd: torch.nn.Module  # the model as called in the step: compiled and/or wrapped by DDP
    opt: torch.optim.Optimizer
    trainable: list
    step: int
    saved_step: int | None  # the step of the last checkpoint written or resumed from: the last good one
    extra: dict  # what every checkpoint's state.json carries besides the step (config, accuracy before, tasks)
    fpt: tuple  # system.flops_coefficients: FLOPs per token, per Σ L², per logit position
    peak: float | None


def build(cfg: TrainConfig, env: Env, data: Data, overwrite=False) -> State:
    """The base model (evaluated before training unless the checkpoint has that result), the adapter, the
    optimizer, and everything a checkpoint restores; the run directory is started (or continued) here."""
    model = install(nanoalign.plumbing.load_model(cfg.model, dtype=env.dtype, device=env.device))
    n_base = sum(p.numel() for p in model.parameters())
    env.say(f"model {cfg.model}: {n_base / 1e6:.1f}M parameters, {env.dtype}, {env.device}"
            + (f", {env.world} processes" if env.world > 1 else "") + (", bf16 autocast" if env.autocast else ""))
    env.say(f"tasks ({len(data.names)}): " + ", ".join(f"{t} ({data.sizes[t]})" for t in data.names))
    if env.master:
        if overwrite:
            clear_run_state(env.out)
        env.out.mkdir(parents=True, exist_ok=True)
        write_atomic(env.out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    before = env.resumed.state.get("before") if env.resumed else None
    if data.test_tasks and before is None:
        before = without_records(evaluate_all_ranks(model, data.tok, data.test_tasks, env, mode=cfg.eval_mode,
                                                    max_new_tokens=cfg.eval_tokens, desc="eval before"))
        env.say("accuracy before training: " + ", ".join(f"{t} {100 * r['accuracy']:.1f}" + (" (collapsed)" if
                r["collapsed"] else "") for t, r in before.items()))

    apply_adapter(model, cfg.adapter, rank=cfg.rank, alpha=cfg.alpha, heads=cfg.heads, dropout=cfg.dropout,
                  targets=[t.strip() for t in cfg.targets.split(",") if t.strip()], num_tasks=len(data.names),
                  **parse_options(cfg.adapter_options))
    model.gradient_checkpointing = cfg.grad_ckpt
    if env.world > 1:  # DDP broadcasts rank 0's initial weights; dropout masks should differ between ranks
        torch.manual_seed(cfg.seed + env.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = count_trainable(model)
    env.say(f"adapter {cfg.adapter}: rank {cfg.rank}, {n_train:,} trainable parameters "
            f"({100 * n_train / n_base:.3f}% of the base)")
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=env.device.type == "cuda")
    step, saved = 0, None
    if env.resumed:
        ckpt = env.resumed
        load_checkpoint(ckpt, model, opt, env.device, env.rank, env.world)
        data.batcher.load_state_dict(ckpt.state["batcher"])
        step = saved = ckpt.state["step"]
        if env.master:
            continue_run_dir(env.out, ckpt, env.say)
        env.say(f"resumed from {ckpt.path} at step {step}")
    fwd = torch.compile(model) if cfg.compile else model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                      broadcast_buffers=False)
    extra = {"config": dataclasses.asdict(cfg), "before": before, "tasks": data.names}
    return State(model, fwd, opt, trainable, step, saved, extra, flops_coefficients(model), peak_flops(env.device))


def train_step(cfg: TrainConfig, env: Env, s: State, batcher, stop) -> dict:
    """Stage 4, the step: learning rate, --grad-accum micro-batches (forward + backward, `micro_batch_backward`), the
    losses summed over ranks, gradient clipping, the AdamW update, and one read of the results by the host, after
    the update: the losses, the gradient norm and whether the weights are still finite. A step that is not finite
    everywhere raises FloatingPointError; the caller has written nothing of it. Returns the step's log record."""
    t0 = time.perf_counter()
    lr = lr_at(s.step, cfg)
    for g in s.opt.param_groups:
        g["lr"] = lr
    ce_sum = align_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    tokens = flops = 0.0
    for micro in range(cfg.grad_accum):
        b = next(batcher)
        if cfg.trainer == "meta":  # k inner SGD steps per task; the query gradients are left in .grad (meta.py)
            st = meta_step(s.model, b, MetaConfig.from_flags(cfg), partial(answer_loss, autocast=env.autocast),
                           scale=1 / cfg.grad_accum)
            ce_sum = ce_sum + st["loss"]
            tokens += st["tokens"]
            flops += st["tokens"] * s.fpt[0] + st["tokens_sq"] * s.fpt[1] + st["logits"] * s.fpt[2]
            continue
        with s.fwd.no_sync() if env.world > 1 and micro < cfg.grad_accum - 1 else nullcontext():
            ce, la, n, n_sq, n_logits = micro_batch_backward(s.fwd, s.model, b, cfg, aligns(cfg),
                                                             len(batcher.tasks), env.autocast, env.device)
        ce_sum, align_sum = ce_sum + ce.double(), align_sum + la.double()
        tokens += n
        flops += n * s.fpt[0] + n_sq * s.fpt[1] + n_logits * s.fpt[2]
    if cfg.trainer == "meta" and env.world > 1:  # functional calls bypass DDP's hooks: sum the ranks' gradients
        for p in s.trainable:                    # (each rank's share is already divided by the episode's n)
            dist.all_reduce(p.grad)
    host = to_device(torch.tensor([tokens, flops, float(stop["flag"])], dtype=torch.float64), env.device)
    summed = all_sum(torch.cat([ce_sum[None], align_sum[None], host]), env.world)
    # clip_grad_norm_ also measures the norm (inf: no clipping), so NaN gradients are caught too
    gnorm = torch.nn.utils.clip_grad_norm_(s.trainable, cfg.grad_clip or float("inf"))
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    finite = all_finite(s.trainable)
    ce_sum, align_sum, tokens, flops, stops, gnorm, finite = torch.cat(
        [summed, gnorm.double()[None], finite.double()[None]]).tolist()  # the step's one host sync
    stop["flag"] = stops > 0
    ce_avg, align_avg = ce_sum / (cfg.grad_accum * env.world), align_sum / (cfg.grad_accum * env.world)
    total = ce_avg + cfg.align_lambda * align_avg if aligns(cfg) else ce_avg
    if not (math.isfinite(total) and math.isfinite(gnorm) and finite):
        raise not_finite(total, gnorm, ce_avg, align_avg, env, s)
    s.step += 1
    dt = time.perf_counter() - t0
    return {"step": s.step, "loss": total, "ce": ce_avg, "align": align_avg, "lr": lr, "grad_norm": gnorm,
            "tokens": int(tokens), "tok_s": tokens / dt,
            "mfu": flops / dt / (s.peak * env.world) if s.peak else None, "mem_mb": peak_memory_mib(env.device),
            "ms": 1000 * dt}


def not_finite(total, gnorm, ce, align, env, s):
    """The error of a step whose loss, gradient norm or updated weights are not finite, naming the step and the last
    good checkpoint (nothing of the failed step is written, so the last one written is good)."""
    if not math.isfinite(total):
        what = f"loss is {total}"
    elif not math.isfinite(gnorm):
        what = f"gradient norm is {gnorm}"
    else:
        what = "the update made adapter weights non-finite"
    kept = "no checkpoint was written yet" if s.saved_step is None else \
        f"the last good checkpoint is {env.out / 'checkpoint'} (step {s.saved_step})"
    return FloatingPointError(f"{what} at step {s.step + 1} (ce {ce:.4g}, align {align:.4g}); nothing of this step "
                              f"was saved, {kept}. Lower --lr or --align-lambda and --resume")


class Progress:
    """Stage 5, log: log.jsonl (every step, appended on resume), the printed line every --log-every steps and the
    progress bar; rank 0 only."""

    def __init__(self, cfg, env, step):
        self.cfg, self.on = cfg, env.master
        self.file = open(env.out / "log.jsonl", "a" if cfg.resume else "w") if self.on else None
        self.bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not self.on, dynamic_ncols=True)

    def step(self, rec):
        if not self.on:
            return
        self.record(rec)
        if rec["step"] % self.cfg.log_every == 0 or rec["step"] == self.cfg.max_steps:
            mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "-"
            self.bar.write(f"step {rec['step']:5d} | loss {rec['loss']:.4f} (ce {rec['ce']:.4f}, align "
                           f"{rec['align']:.4f}) | lr {rec['lr']:.2e} | {rec['tok_s']:,.0f} tok/s | mfu {mfu} | mem "
                           f"{rec['mem_mb']:,.0f} MB | {rec['ms']:.0f} ms")
        self.bar.update(1)

    def record(self, rec):
        if self.on:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def say(self, text):
        if self.on:
            self.bar.write(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if self.file:
            self.file.close()


@contextmanager
def catch_interrupts(env):
    """Ctrl-C (or SIGTERM from a scheduler): finish the step in flight, save, exit 0; a second Ctrl-C aborts.
    Yields the flag the loop reads; the old handlers are back afterwards."""
    stop = {"flag": False}

    def on_signal(sig, frame):
        if stop.get("saved"):  # the final saves are done (finish): stop the evaluation now
            raise KeyboardInterrupt(f"interrupted after the final saves; evaluate {env.out / 'adapter'} with eval.py")
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        env.say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def save(cfg, env, s, data):
    """Stage 5, checkpoint: every rank takes part (RNG states); the step is then the last good one."""
    save_checkpoint(env.out / "checkpoint", s.model, s.opt, s.step, data.batcher, s.extra, env.device, env.rank,
                    env.world, s.trainable)
    s.saved_step = s.step


def finish(cfg: TrainConfig, env: Env, data: Data, s: State, stop):
    """Stage 6, final save and evaluation: the last checkpoint, the adapter (nanoalign format, plus PEFT when it is
    a plain LoRA at inference), the evaluation after training (on every rank), results.json. Returns the result on
    rank 0, None on the others, and None when a signal came during the saves (they finish; the evaluation is
    skipped, with a line)."""
    save(cfg, env, s, data)
    if env.master:
        save_adapter(s.model, env.out / "adapter")
        write_atomic(env.out / "adapter" / "tasks.json", json.dumps({"tasks": data.names}))  # task ids, for MTL-LoRA
        try:
            peft = export_peft_dirs(s.model, env.out / "peft", data.names, cfg.model)
            env.say(f"saved {env.out / 'adapter'} (nanoalign) and {peft}")
        except ValueError as e:  # routers are not a plain LoRA at inference
            env.say(f"saved {env.out / 'adapter'} (nanoalign); no PEFT export: {e}")
    stop["saved"] = True
    if all_sum(torch.tensor([float(stop["flag"])], dtype=torch.float64, device=env.device), env.world).item():
        skipped = f"; skipped the evaluation: python eval.py --adapter-dir {env.out}" if data.test_tasks else ""
        env.say(f"interrupted: saved {env.out / 'checkpoint'} and {env.out / 'adapter'} at step {s.step} (the "
                f"last){skipped}")
        return None
    after = evaluate_all_ranks(s.model, data.tok, data.test_tasks, env, mode=cfg.eval_mode,
                               max_new_tokens=cfg.eval_tokens, task_ids={t: i for i, t in enumerate(data.names)},
                               desc="eval after") if data.test_tasks else None
    if not env.master:
        return None
    result = {"config": dataclasses.asdict(cfg), "steps": s.step, "final": ce_summary(env.out / "log.jsonl")}
    if after:
        write_atomic(env.out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for res in after.values()
                                                            for r in res["records"]))
        after = without_records(after)
        before = s.extra["before"]
        result.update(before=before, after=after)
        n = min(len(v) for v in data.test_tasks.values())
        print(markdown_table({"before": before, "after": after},
                             title=f"\nper-task accuracy (%), {n} test examples per task, {cfg.eval_mode}"))
        print("\n" + diagnostics_table(after, title="after training: per-task diagnostics"))
    write_atomic(env.out / "results.json", json.dumps(result, indent=2))
    return result


def train(cfg: TrainConfig, overwrite=False):
    """One training run, stage by stage. Returns the result dict (rank 0); None when it stopped early (--stop-at,
    Ctrl-C: a checkpoint was saved, continue with cfg.resume) and on the other ranks. overwrite: start fresh in a run
    directory holding an earlier run (train.py --overwrite); without it that is refused."""
    check_config(cfg, overwrite)
    env = setup(cfg, overwrite)
    data = load_data(cfg, env)
    s = build(cfg, env, data, overwrite)
    with catch_interrupts(env) as stop:  # the final saves (finish) too: a signal there waits for them
        with Progress(cfg, env, s.step) as log:
            s.model.train()
            while s.step < cfg.max_steps:
                log.step(train_step(cfg, env, s, data.batcher, stop))
                halt = s.step < cfg.max_steps and (stop["flag"] or (cfg.stop_at and s.step >= cfg.stop_at))
                if halt or (s.step % cfg.ckpt_every == 0 and s.step < cfg.max_steps):
                    save(cfg, env, s, data)
                if halt:
                    why = "interrupted" if stop["flag"] else "--stop-at"
                    log.say(f"{why}: saved {env.out / 'checkpoint'} at step {s.step}; continue with the same command "
                            "plus --resume")
                    return None
                if cfg.eval_every and s.step % cfg.eval_every == 0 and s.step < cfg.max_steps and data.test_tasks:
                    acc = accuracies(evaluate_all_ranks(s.model, data.tok, data.test_tasks, env, mode=cfg.eval_mode,
                                                        max_new_tokens=cfg.eval_tokens, desc=f"eval step {s.step}",
                                                        task_ids={t: i for i, t in enumerate(data.names)}))
                    log.say(f"eval step {s.step}: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()))
                    log.record({"step": s.step, "eval": acc})
        return finish(cfg, env, data, s, stop)


def length_groups(lengths, max_groups=4, overhead=16):
    """Rows of a micro-batch in groups of similar length, each padded only to its own longest row: of the splits of
    the length-sorted rows into k equal groups (k <= max_groups), the one with the fewest padded tokens plus
    `overhead` tokens per extra forward. A task-balanced batch mixes short and long tasks (SST-2 ~40 tokens, BoolQ
    ~150-300), so one padded block wastes up to half its tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = None
    for k in range(1, min(max_groups, len(order)) + 1):
        groups = [sorted(order[i * len(order) // k:(i + 1) * len(order) // k]) for i in range(k)]  # rows in batch order
        cost = sum(len(g) * max(lengths[j] for j in g) for g in groups) + overhead * (k - 1)
        if best is None or cost < best[0]:
            best = (cost, groups)
    return best[1]


def micro_batch_backward(fwd, model, batch, cfg, align_on, num_tasks, autocast, device):
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
                ce, la = alignment_objective(ce_sum / n_targets, parts, cfg, align_on, num_tasks)
                ((ce + cfg.align_lambda * la) / cfg.grad_accum).backward()
    if len(groups) > 1:
        ce, la = alignment_objective(ce_sum / n_targets, parts, cfg, align_on, num_tasks)
        ((ce + cfg.align_lambda * la) / cfg.grad_accum).backward()
    return ce.detach(), la.detach(), int(sum(lengths)), float(sum(t * t for t in lengths)), n_targets


def alignment_objective(ce, parts, cfg, align_on, num_tasks):
    """(CE, L_align) of a micro-batch from its groups' (A-outputs, token mask, task ids); L_align is 0 when off."""
    if not align_on:
        return ce, torch.zeros((), device=ce.device)
    T = max(mask.shape[1] for _, mask, _ in parts)
    a_outputs = {name: torch.cat([F.pad(a[name], (0, 0, 0, T - a[name].shape[1])) for a, _, _ in parts])
                 for name in parts[0][0]}
    token_mask = torch.cat([F.pad(mask, (0, T - mask.shape[1])) for _, mask, _ in parts])
    task_ids = torch.cat([t for _, _, t in parts])
    kw = {"max_rows": cfg.mmd_rows or None} if cfg.align_loss == "mmd" else {}
    return ce, alignment_loss(a_outputs, token_mask, task_ids, kind=cfg.align_loss,
                              position_wise=cfg.align_position_wise, num_tasks=num_tasks, **kw)


def ce_summary(log_path):
    """Mean CE of the first and last 5 logged steps (a one-glance "did it learn")."""
    ce = [r["ce"] for r in read_log(log_path) if "ce" in r]
    return {"ce_first5": sum(ce[:5]) / len(ce[:5]), "ce_last5": sum(ce[-5:]) / len(ce[-5:])} if ce else {}


def main(argv=None):
    cfg, overwrite = parse_command(argv)
    rank = int(os.environ.get("RANK", "0"))
    from safetensors import SafetensorError
    try:
        train(cfg, overwrite)
        if dist.is_initialized():
            # the other ranks wait here while rank 0 writes the results: a gloo rank that tears down its process
            # group while a peer is still connected can abort ("terminate called without an active exception")
            dist.barrier()
    except KeyboardInterrupt as e:
        print(f"\nerror: {e or 'interrupted before a checkpoint could be written'}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError, HubError, SafetensorError, torch.OutOfMemoryError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            e = "out of memory; lower --batch-per-task or --seq-len, or add --grad-ckpt"
        elif isinstance(e, OSError):
            e = os_error_line(e)
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
