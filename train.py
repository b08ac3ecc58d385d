"""Multi-task LoRA fine-tuning: one plain loop for every adapter, Align-LoRA's loss included.

    python train.py                                   # Align-LoRA on smollm2-135m + the builtin suite (CPU, minutes)
    python train.py --adapter align --rank 32 --model qwen2.5-0.5b --data commonsense
    torchrun --nproc_per_node 2 train.py ...          # DistributedDataParallel, task balance kept per rank

Every micro-batch holds `--batch-per-task` examples of every task (task ids travel with the batch), so the
Align-LoRA objective L = L_LM + λ·L_align (METHODS §2.10, §3.7) is computed per micro-batch and back-propagated with
the LM loss in the same backward. Only answer positions get logits (a 152k vocabulary makes full logits the largest
tensor of a step). Checkpoints hold adapter, optimizer, RNG states and data position (the learning rate is a
function of the step), written atomically, so `--resume` continues the exact same loss curve (bitwise on CPU);
Ctrl-C saves one and exits; a NaN/inf loss stops before the optimizer step and keeps the last good checkpoint.

Writes out/<run>/: config.json, log.jsonl (one record per step), checkpoint/, adapter/ (nanoalign format),
peft/ (when the adapter is a plain LoRA at inference) and results.json (per-task accuracy before and after).
"""

import os

# Before torch starts OpenMP: threads that spin-wait while another process holds a core stall every parallel op
# (measured on a shared 2-core machine: a SmolLM2-135M forward took 10 s instead of 1.3 s). Passive waiting should
# cost little on a dedicated machine (not measured there).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import math
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import nanoalign
from nanoalign.adapters import (KINDS, adapter_context, apply_adapter, check_options, count_trainable, export_peft,
                                load_adapter, save_adapter)
from nanoalign.align import alignment_loss
from nanoalign.data import IGNORE_INDEX, BalancedBatcher, answer_positions, encode_example, load_tasks
from nanoalign.evaluate import MODES, accuracies, diagnostics_table, evaluate, markdown_table, without_records
from nanoalign.hub import HubError
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
    adapter: str = opt("align", "adapter kind", choices=list(KINDS))
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
    pool_seed: int = opt(0, "seed of the --max-per-task training subsample and the --eval-max test subsample (apart "
                         "from --seed, so that seeds change init, dropout and data order, not the data)")
    seq_len: int = opt(256, "max tokens per example (the prompt is cut from the left)")
    # optimisation
    max_steps: int = opt(100, "optimizer steps (the cosine schedule ends here)")
    stop_at: int = opt(0, "save a checkpoint and exit after this step, as if interrupted (0: run to --max-steps)")
    batch_per_task: int = opt(1, "examples of EVERY task in each micro-batch (per rank)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-3, "peak learning rate")
    warmup: int = opt(10, "linear warmup steps, then cosine decay to 10%% of --lr")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    # alignment (METHODS §3)
    align_loss: str = opt("kl", "alignment loss: symmetric KL (A-LoRA-K) or multi-kernel MMD (A-LoRA-M)",
                          choices=["kl", "mmd"])
    align_lambda: float = opt(0.1, "λ in L = L_LM + λ·L_align")
    align_any: bool = opt(False, "add the alignment loss to a non-align adapter too (METHODS §7 claim 9)")
    align_tokens: str = opt("all", "tokens whose A-outputs are aligned: every real token (METHODS §3.7) or the "
                            "answer tokens", choices=["all", "answer"])
    align_position_wise: bool = opt(False, "per-position statistics, as the released code (METHODS §3.3)")
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


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        kw = dict(default=f.default, help=f.metadata["help"])
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=f.type, choices=f.metadata["choices"])
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return TrainConfig(**vars(p.parse_args(argv)))


def check_config(cfg: TrainConfig):
    positive = ["rank", "heads", "max_steps", "batch_per_task", "grad_accum", "seq_len", "log_every", "ckpt_every",
                "eval_tokens", "length_groups"]
    bad = next((f for f in positive if getattr(cfg, f) < 1), None)
    if bad:
        raise ValueError(f"--{bad.replace('_', '-')} must be at least 1, got {getattr(cfg, bad)}")
    bad = next((f for f in ["warmup", "max_per_task", "stop_at", "eval_every", "eval_max", "grad_clip",
                            "weight_decay"] if getattr(cfg, f) < 0), None)
    if bad:
        raise ValueError(f"--{bad.replace('_', '-')} must not be negative, got {getattr(cfg, bad)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    check_options(cfg.adapter, parse_options(cfg.adapter_options))
    # a NaN --align-lambda is let through on purpose: the NaN check below stops at the first step and names it


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


# ----------------------------------------------------------------------------- helpers

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def lr_at(step, cfg):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def flops_per_token(model):
    """Training FLOPs per token for LoRA (STYLE.md), as (a, b) with FLOPs/token = a + b·T for sequence length T:
    a = 4·N_frozen (forward + input gradient; frozen weights get no weight gradient) + 6·N_trainable,
    b·T = 12·L·T·d_attn (attention scores and values). Embeddings and lm_head are left out."""
    c = model.config
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if not p.requires_grad and n.startswith("model.layers") and p.ndim == 2)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * frozen + 6 * lora, 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim


PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}  # bf16


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def all_sum(values, device, world):
    """Sum a few floats over ranks (losses, token counts, the Ctrl-C flag), so every rank takes the same decisions."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def rng_states(device, world):
    """Every rank's torch RNG state (CPU, plus CUDA) as uint8 tensors, gathered so rank 0 can save them all."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    if world == 1:
        return [state]
    out = [torch.empty_like(state, device=device) for _ in range(world)]
    dist.all_gather(out, state.to(device))
    return [s.cpu() for s in out]


def set_rng_state(state, device):
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[n:].clone(), device)


# ----------------------------------------------------------------------------- checkpoints (safetensors + JSON)

def save_checkpoint(path: Path, model, opt, step, batcher, extra, device, rank, world):
    """Called on every rank (the RNG states are gathered); rank 0 writes `<path>.tmp/` completely, then swaps it in
    with renames, so a crash at any moment leaves a complete checkpoint at `path` or `<path>.old`."""
    from safetensors.torch import save_file
    rngs = rng_states(device, world)
    if rank != 0:
        return
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    sd = opt.state_dict()
    save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()},
              str(tmp / "optimizer.safetensors"))
    save_file({f"rank{r}": s for r, s in enumerate(rngs)}, str(tmp / "rng.safetensors"))
    state = {"step": step, "world_size": world, "batcher": batcher.state_dict(),
             "optimizer_groups": sd["param_groups"], **extra}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path):
    """The checkpoint directory to resume from and its state.json, or a clear error."""
    if not (path / "state.json").is_file() and (path.with_name(path.name + ".old") / "state.json").is_file():
        path = path.with_name(path.name + ".old")  # interrupted between the two renames: the old one is complete
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from; run without --resume to start fresh")
    return path, json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, state, model, opt, device, rank, world):
    """Adapter, optimizer and this rank's RNG state from a checkpoint (the data position is the caller's)."""
    from safetensors.torch import load_file
    if state["world_size"] != world:
        raise ValueError(f"{path} was written by {state['world_size']} process(es); resume with the same number "
                         f"(this run has {world})")
    load_adapter(model, path)
    state_by_param = {}
    for key, t in load_file(str(path / "optimizer.safetensors")).items():
        i, name = key.split(".", 1)
        state_by_param.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state_by_param, "param_groups": state["optimizer_groups"]})
    set_rng_state(load_file(str(path / "rng.safetensors"))[f"rank{rank}"], device)


MUST_MATCH = ["model", "adapter", "rank", "alpha", "heads", "adapter_options", "targets", "data", "format", "tasks",
              "max_per_task", "pool_seed", "batch_per_task", "seq_len", "seed", "length_groups"]


def check_resume_config(old: dict, cfg: TrainConfig, say):
    """Same model, adapter and data stream as the checkpoint, or an error; other changes are listed."""
    def value(k, v):  # adapter options compare parsed: "x=false" is "x=False"
        return parse_options(v) if k == "adapter_options" else v

    for k in MUST_MATCH:
        if k in old and value(k, old[k]) != value(k, getattr(cfg, k)):
            raise ValueError(f"--resume: the checkpoint was trained with --{k.replace('_', '-')} {old[k]!r}, this "
                             f"run has {getattr(cfg, k)!r}; resume with the same setting")
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in old and k not in ("resume",) and old[k] != v and not (v != v and old[k] != old[k])]
    if changed:
        say("note: resuming with changed settings: " + ", ".join(changed))


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig):
    check_config(cfg)
    device = pick_device(cfg.device)
    rank, world, device = setup_distributed(device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    run = cfg.run_name or f"{Path(cfg.model).name}-{cfg.adapter}-r{cfg.rank}"
    out = Path(cfg.out) / run
    ckpt_dir = out / "checkpoint"
    resumed = find_checkpoint(ckpt_dir) if cfg.resume else None  # fail fast, before loading anything
    if resumed:
        check_resume_config(resumed[1]["config"], cfg, say)
    torch.manual_seed(cfg.seed)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    use_autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")

    # data: tasks tokenised once; task ids are the positions of the sorted task names (nanoalign.data)
    subset = sorted({t.strip() for t in cfg.tasks.split(",") if t.strip()})
    train_tasks = select_tasks(load_tasks(cfg.data, "train", data_dir=cfg.data_dir, seed=cfg.pool_seed, fmt=cfg.format,
                                          max_per_task=cfg.max_per_task or None), subset, cfg.data)
    test_tasks = load_eval_tasks(cfg, subset)
    names = sorted(train_tasks)
    tok = nanoalign.load_tokenizer(cfg.model)
    encoded = {}
    with tqdm(total=sum(map(len, train_tasks.values())), desc="tokenise", leave=False, disable=not master) as bar:
        for t in names:
            encoded[t] = [encode_example(tok, ex, cfg.seq_len) for ex in train_tasks[t]]
            bar.update(len(encoded[t]))
    batcher = BalancedBatcher(encoded, per_task=cfg.batch_per_task, seed=cfg.seed, rank=rank, world_size=world,
                              pad_id=tok.pad_id)

    model = nanoalign.load_model(cfg.model, dtype=dtype, device=device)
    n_base = sum(p.numel() for p in model.parameters())
    say(f"model {cfg.model}: {n_base / 1e6:.1f}M parameters, {dtype}, {device}"
        + (f", {world} processes" if world > 1 else "") + (", bf16 autocast" if use_autocast else ""))
    say(f"tasks ({len(names)}): " + ", ".join(f"{t} ({len(encoded[t])})" for t in names))
    if master:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        if not cfg.resume and (ckpt_dir / "state.json").exists():
            say(f"note: {ckpt_dir} holds an earlier run; starting fresh (pass --resume to continue it)")
    before = resumed[1].get("before") if resumed else None
    if test_tasks and master and before is None:
        before = without_records(evaluate(model, tok, test_tasks, mode=cfg.eval_mode, max_new_tokens=cfg.eval_tokens,
                                          desc="eval before"))
        say("accuracy before training: " + ", ".join(f"{t} {100 * r['accuracy']:.1f}" + (" (collapsed)" if
            r["collapsed"] else "") for t, r in before.items()))

    apply_adapter(model, cfg.adapter, rank=cfg.rank, alpha=cfg.alpha, heads=cfg.heads, dropout=cfg.dropout,
                  targets=[t.strip() for t in cfg.targets.split(",") if t.strip()], num_tasks=len(names),
                  **parse_options(cfg.adapter_options))
    model.gradient_checkpointing = cfg.grad_ckpt
    if world > 1:  # DDP broadcasts rank 0's initial weights; dropout masks should differ between ranks
        torch.manual_seed(cfg.seed + rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = count_trainable(model)
    say(f"adapter {cfg.adapter}: rank {cfg.rank}, {n_train:,} trainable parameters "
        f"({100 * n_train / n_base:.3f}% of the base)")
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    step = 0
    if resumed:
        load_checkpoint(resumed[0], resumed[1], model, opt, device, rank, world)
        batcher.load_state_dict(resumed[1]["batcher"])
        step = resumed[1]["step"]
        if master and (out / "log.jsonl").exists():  # drop records past the checkpoint (a crash after it)
            keep = [line for line in (out / "log.jsonl").read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            write_atomic(out / "log.jsonl", "".join(line + "\n" for line in keep))
        say(f"resumed from {resumed[0]} at step {step}")
    fwd = torch.compile(model) if cfg.compile else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    align_on = cfg.adapter == "align" or cfg.align_any
    extra = {"config": dataclasses.asdict(cfg), "before": before, "tasks": names}

    # Ctrl-C (or SIGTERM from a scheduler): finish the step in flight, save, exit 0; a second Ctrl-C aborts
    stop = {"flag": False}

    def on_signal(sig, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    log_f = open(out / "log.jsonl", "a" if resumed else "w") if master else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not master, dynamic_ncols=True)
    peak, (fpt_dense, fpt_attn) = peak_flops(device), flops_per_token(model)
    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            ce_sum = align_sum = tokens = flops = 0.0
            for micro in range(cfg.grad_accum):
                b = next(batcher)
                last = micro == cfg.grad_accum - 1
                with fwd.no_sync() if world > 1 and not last else nullcontext():
                    ce, la, n, padded = micro_batch_backward(fwd, model, b, cfg, align_on, len(names), use_autocast,
                                                             device)
                ce_sum += ce
                align_sum += la
                tokens += n
                flops += n * fpt_dense + fpt_attn * padded
            ce_sum, align_sum, tokens, flops, stops = all_sum([ce_sum, align_sum, tokens, flops, stop["flag"]],
                                                              device, world)
            stop["flag"] = stops > 0
            ce_avg, align_avg = ce_sum / (cfg.grad_accum * world), align_sum / (cfg.grad_accum * world)
            total = ce_avg + cfg.align_lambda * align_avg if align_on else ce_avg
            # clip_grad_norm_ also measures the norm (inf: no clipping), so NaN gradients are caught too
            gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf")))
            if not (math.isfinite(total) and math.isfinite(gnorm)):
                what = f"loss is {total}" if not math.isfinite(total) else f"gradient norm is {gnorm}"
                kept = f"the last good checkpoint is {ckpt_dir}" if (ckpt_dir / "state.json").exists() \
                    else "no checkpoint was written yet"
                raise FloatingPointError(f"{what} at step {step + 1} (ce {ce_avg:.4g}, align {align_avg:.4g}); "
                                         f"stopped before the update, {kept}. Lower --lr or --align-lambda and "
                                         f"--resume")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": total, "ce": ce_avg, "align": align_avg, "lr": lr, "grad_norm": gnorm,
                   "tokens": int(tokens), "tok_s": tokens / dt, "mfu": flops / dt / (peak * world) if peak else None,
                   "mem_mb": memory_mb(device), "ms": 1000 * dt}
            if master:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "-"
                    bar.write(f"step {step:5d} | loss {total:.4f} (ce {ce_avg:.4f}, align {align_avg:.4f}) | "
                              f"lr {lr:.2e} | {rec['tok_s']:,.0f} tok/s | mfu {mfu} | mem {rec['mem_mb']:,.0f} MB | "
                              f"{rec['ms']:.0f} ms")
                bar.update(1)
            halt = step < cfg.max_steps and (stop["flag"] or (cfg.stop_at and step >= cfg.stop_at))
            if halt or (step % cfg.ckpt_every == 0 and step < cfg.max_steps):
                save_checkpoint(ckpt_dir, model, opt, step, batcher, extra, device, rank, world)
            if halt:
                why = "interrupted" if stop["flag"] else "--stop-at"
                if master:
                    bar.write(f"{why}: saved {ckpt_dir} at step {step}; continue with the same command plus --resume")
                return None
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and master and test_tasks:
                acc = accuracies(evaluate(model, tok, test_tasks, mode=cfg.eval_mode, max_new_tokens=cfg.eval_tokens,
                                          task_ids={t: i for i, t in enumerate(names)}, desc=f"eval step {step}"))
                bar.write(f"eval step {step}: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()))
                log_f.write(json.dumps({"step": step, "eval": acc}) + "\n")
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if log_f:
            log_f.close()

    save_checkpoint(ckpt_dir, model, opt, step, batcher, extra, device, rank, world)
    if not master:
        return None
    save_adapter(model, out / "adapter")
    write_atomic(out / "adapter" / "tasks.json", json.dumps({"tasks": names}))  # task ids, for MTL-LoRA at eval
    try:
        export_peft(model, out / "peft", base_model_name_or_path=cfg.model)
        say(f"saved {out / 'adapter'} (nanoalign) and {out / 'peft'} (PEFT LoRA)")
    except ValueError as e:  # routers and per-task adapters are not a plain LoRA at inference
        say(f"saved {out / 'adapter'} (nanoalign); no PEFT export: {e}")
    result = {"config": dataclasses.asdict(cfg), "steps": step, "final": ce_summary(out / "log.jsonl")}
    if test_tasks:
        after = evaluate(model, tok, test_tasks, mode=cfg.eval_mode, max_new_tokens=cfg.eval_tokens,
                         task_ids={t: i for i, t in enumerate(names)}, desc="eval after")
        write_atomic(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for res in after.values()
                                                        for r in res["records"]))
        after = without_records(after)
        result.update(before=before, after=after)
        n = min(len(v) for v in test_tasks.values())
        print(markdown_table({"before": before, "after": after},
                             title=f"\nper-task accuracy (%), {n} test examples per task, {cfg.eval_mode}"))
        print("\n" + diagnostics_table(after, title="after training: per-task diagnostics"))
    write_atomic(out / "results.json", json.dumps(result, indent=2))
    return result


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


def micro_batch_backward(fwd, model, batch, cfg, align_on, num_tasks, use_autocast, device):
    """Forward and backward of one task-balanced micro-batch: L = CE over its answer tokens (+ λ·L_align over all
    its rows), divided by --grad-accum. Returns (ce, align loss, real tokens, Σ_rows T_row²) as Python floats.

    Without gradient checkpointing the rows run as length groups (`length_groups`), one forward each; the CE is
    summed over the groups' answer tokens and divided by their total, and the alignment loss sees every row's
    A-outputs at once (right-padded to one length, the padding masked out), so L is the loss of the whole micro-batch
    and the backward is one. With checkpointing the blocks re-run the adapters during the backward, which must then
    happen inside the adapter context: one group (and under DDP, whose reducer expects one forward per backward)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    one = cfg.grad_ckpt or dist.is_initialized()  # DDP: one forward per backward, as its reducer expects
    groups = [list(range(len(lengths)))] if one else length_groups(lengths, cfg.length_groups)
    ce_sum, n_targets, parts = 0.0, 0, []
    for rows in groups:
        T = max(lengths[i] for i in rows)
        ids, mask, labels = (batch[k][rows, :T].to(device) for k in ("input_ids", "attention_mask", "labels"))
        task_ids = batch["task_ids"][rows].to(device)
        at, targets = answer_positions(labels)  # logits only where the next token is labelled
        with adapter_context(model, task_ids=task_ids, collect=align_on) as actx:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                logits = fwd(ids, mask, logits_at=at)
            ce_sum = ce_sum + F.cross_entropy(logits.float(), targets, reduction="sum")
            n_targets += targets.numel()
            parts.append((actx.a_outputs, mask if cfg.align_tokens == "all" else labels != IGNORE_INDEX, task_ids))
            if len(groups) == 1:  # inside the context: checkpointed blocks re-run the adapters in the backward
                ce, la = alignment_objective(ce_sum / n_targets, parts, cfg, align_on, num_tasks)
                ((ce + cfg.align_lambda * la) / cfg.grad_accum).backward()
    if len(groups) > 1:
        ce, la = alignment_objective(ce_sum / n_targets, parts, cfg, align_on, num_tasks)
        ((ce + cfg.align_lambda * la) / cfg.grad_accum).backward()
    return ce.item(), la.item(), int(sum(lengths)), float(sum(t * t for t in lengths))


def alignment_objective(ce, parts, cfg, align_on, num_tasks):
    """(CE, L_align) of a micro-batch from its groups' (A-outputs, token mask, task ids); L_align is 0 when off."""
    if not align_on:
        return ce, torch.zeros((), device=ce.device)
    T = max(mask.shape[1] for _, mask, _ in parts)
    a_outputs = {name: torch.cat([F.pad(a[name], (0, 0, 0, T - a[name].shape[1])) for a, _, _ in parts])
                 for name in parts[0][0]}
    token_mask = torch.cat([F.pad(mask, (0, T - mask.shape[1])) for _, mask, _ in parts])
    task_ids = torch.cat([t for _, _, t in parts])
    return ce, alignment_loss(a_outputs, token_mask, task_ids, kind=cfg.align_loss,
                              position_wise=cfg.align_position_wise, num_tasks=num_tasks)


def ce_summary(log_path):
    """Mean CE of the first and last 5 logged steps (a one-glance "did it learn")."""
    ce = [r["ce"] for r in map(json.loads, log_path.read_text().splitlines()) if "ce" in r]
    return {"ce_first5": sum(ce[:5]) / len(ce[:5]), "ce_last5": sum(ce[-5:]) / len(ce[-5:])} if ce else {}


def main(argv=None):
    cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        train(cfg)
        if dist.is_initialized():
            # the other ranks wait here while rank 0 saves and evaluates: a gloo rank that tears down its process
            # group while a peer is still connected can abort ("terminate called without an active exception")
            dist.barrier()
    except KeyboardInterrupt:
        print("\nerror: interrupted before a checkpoint could be written", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, FloatingPointError, HubError, torch.OutOfMemoryError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            e = "out of memory; lower --batch-per-task or --seq-len, or add --grad-ckpt"
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
