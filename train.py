"""Multi-task LoRA fine-tuning: one plain loop for every adapter, Align-LoRA's loss included.

    python train.py                                   # Align-LoRA on smollm2-135m + the builtin suite (CPU, minutes)
    python train.py --adapter align --rank 32 --model qwen2.5-0.5b --data commonsense
    torchrun --nproc_per_node 2 train.py ...          # DistributedDataParallel, task balance kept per rank

Every micro-batch holds `--batch-per-task` examples of every task (task ids travel with the batch), so the
alignment loss L = L_LM + λ·L_align (METHODS §2.10, §3.7) is computed per micro-batch and back-propagated with the
LM loss in the same backward. Only answer positions get logits (a 152k vocabulary makes full logits the largest
tensor of a step). Checkpoints hold adapter, optimizer, schedule, RNG and data position, written atomically, so
`--resume` continues the exact same loss curve (bitwise on CPU); Ctrl-C saves one and exits.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import nanoalign
from nanoalign.adapters import adapter_context, apply_adapter, count_trainable, export_peft, save_adapter, load_adapter
from nanoalign.align import alignment_loss
from nanoalign.data import BalancedBatcher, encode_example, load_tasks
from nanoalign.evaluate import evaluate, markdown_table


@dataclass
class TrainConfig:
    """Defaults follow the paper's recipe (METHODS §2.1/§2.10: gate/up/down, α=32, dropout 0.1, AdamW without weight
    decay, λ=0.1) scaled down so that `python train.py` finishes on 2 CPU cores in a few minutes: a small model, a
    short schedule and a higher learning rate."""
    model: str = "smollm2-135m"      # alias, local directory or HF repo id
    adapter: str = "align"           # lora | align | hydra | hydra-norouter | rlora | mlora | mtl | multilora
    rank: int = 8
    alpha: float = 32.0
    heads: int = 3                   # multi-head adapters: number of B heads (MultiLoRA: number of pairs)
    targets: str = "gate_proj,up_proj,down_proj"
    dropout: float = 0.1
    data: str = "builtin"            # suite (builtin, glue, commonsense), comma list of tasks, or a .jsonl file
    tasks: str = ""                  # optional subset of the suite's tasks, comma separated
    data_dir: str = "data"
    max_per_task: int = 0            # cap training examples per task (0: the suite's caps)
    max_steps: int = 120
    batch_per_task: int = 2          # examples of EVERY task in each micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10                 # linear warmup steps, then cosine decay to 10% of lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 256
    dtype: str = "auto"              # base weights: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    autocast: str = "auto"           # auto (bf16 autocast on CUDA) | bf16 | off
    grad_ckpt: bool = False
    align_loss: str = "kl"           # kl | mmd
    align_lambda: float = 0.1        # λ; used by --adapter align, or any adapter when --align-any is set
    align_any: bool = False          # add the alignment loss to a non-align adapter (METHODS §7 claim 9)
    align_tokens: str = "all"        # all: every real token (METHODS §3.7) | answer: answer tokens only
    align_position_wise: bool = False
    out: str = "out"
    run: str = ""                    # run name; default <model>-<adapter>-r<rank>
    resume: bool = False
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    eval_every: int = 0              # 0: evaluate only before and after training
    eval_max: int = 50               # test examples per task for the before/after evaluation (0: skip)
    eval_mode: str = "generate"      # generate | loglik
    log_every: int = 1
    ckpt_every: int = 50


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), f.type)
            p.add_argument(flag, type=typ, default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------- helpers

def pick_device(name):
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def flops_per_token(model, seq_len):
    """Training FLOPs per token for LoRA (STYLE.md): 4·N_frozen (forward + input-gradient) + 6·N_trainable
    + 12·L·T·d_attn (attention scores and values, forward and backward). Embedding and lm_head excluded."""
    c = model.config
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if not p.requires_grad and n.startswith("model.layers") and p.ndim == 2)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * frozen + 6 * lora + 12 * c.num_hidden_layers * seq_len * c.num_attention_heads * c.head_dim


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- checkpoints (safetensors + JSON)

def save_checkpoint(path: Path, model, opt, step, batcher_state, cfg, log_tail):
    """Write into `<path>.tmp`, then swap directories: a crash at any moment leaves a complete checkpoint."""
    from safetensors.torch import save_file
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    params = [p for g in opt.param_groups for p in g["params"]]
    opt_tensors, opt_steps = {}, {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                opt_tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_steps[f"{i}.{k}"] = float(v)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(rng, tmp / "rng.safetensors")
    state = {"step": step, "opt_scalars": opt_steps, "batcher": batcher_state, "python_random": random.getstate(),
             "config": dataclasses.asdict(cfg), "log_tail": log_tail}
    (tmp / "state.json").write_text(json.dumps(state, default=list))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, opt):
    from safetensors.torch import load_file
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # interrupted while swapping: the previous one is complete
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from; run without --resume to start fresh")
    state = json.loads((path / "state.json").read_text())
    load_adapter(model, path)
    params = [p for g in opt.param_groups for p in g["params"]]
    tensors = load_file(path / "optimizer.safetensors")
    for i, p in enumerate(params):
        st = {k.split(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        # AdamW keeps `step` as a 0-d fp32 tensor: on CPU, or on the parameter's device when fused
        on = p.device if opt.defaults.get("fused") else "cpu"
        st.update({k.split(".", 1)[1]: torch.tensor(v, dtype=torch.float32, device=on)
                   for k, v in state["opt_scalars"].items()
                   if k.split(".", 1)[0] == str(i)})
        if st:
            opt.state[p] = st
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda"))])
    py = state["python_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg.device)
    if ddp:
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    use_autocast = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    run = cfg.run or f"{Path(cfg.model).name}-{cfg.adapter}-r{cfg.rank}"
    out = Path(cfg.out) / run
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    # data: every task, tokenised once; task ids are the sorted task names' indices
    subset = [t for t in cfg.tasks.split(",") if t]
    train_tasks = load_tasks(cfg.data, "train", data_dir=cfg.data_dir, max_per_task=cfg.max_per_task or None,
                             seed=cfg.seed, tasks=subset or None)
    test_tasks = load_tasks(cfg.data, "test", data_dir=cfg.data_dir, max_per_task=cfg.eval_max or None,
                            seed=cfg.seed, tasks=subset or None) if cfg.eval_max else {}
    names = sorted(train_tasks)
    tok = nanoalign.load_tokenizer(cfg.model)
    encoded = {t: [encode_example(tok, ex, cfg.seq_len) for ex in tqdm(train_tasks[t], desc=f"tokenise {t}",
                                                                        leave=False, disable=not master)]
               for t in names}
    batcher = BalancedBatcher(encoded, per_task=cfg.batch_per_task, seed=cfg.seed, rank=rank, world_size=world,
                              pad_id=tok.pad_id)

    model = nanoalign.load_model(cfg.model, dtype=dtype, device=device)
    say(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}, {device}")
    say(f"tasks ({len(names)}): " + ", ".join(f"{t} ({len(encoded[t])})" for t in names))
    if cfg.eval_max and master:
        before = evaluate(model, tok, test_tasks, mode=cfg.eval_mode)
    apply_adapter(model, cfg.adapter, rank=cfg.rank, alpha=cfg.alpha, heads=cfg.heads, dropout=cfg.dropout,
                  targets=tuple(cfg.targets.split(",")), num_tasks=len(names))
    for p in model.parameters():  # adapter weights train in fp32 even on a bf16 base (STYLE.md)
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing = cfg.grad_ckpt
    n_train = count_trainable(model)
    say(f"adapter {cfg.adapter}: rank {cfg.rank}, {n_train:,} trainable params "
        f"({100 * n_train / sum(p.numel() for p in model.parameters() if not p.requires_grad):.3f}% of the base)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    step, log_tail = 0, []
    ckpt_dir = out / "checkpoint"
    if cfg.resume:
        state = load_checkpoint(ckpt_dir, model, opt)
        step, log_tail = state["step"], state["log_tail"]
        batcher.load_state_dict(state["batcher"])
        say(f"resumed from {ckpt_dir} at step {step}")
    fwd = model
    if cfg.compile:
        fwd = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    align_on = cfg.adapter == "align" or cfg.align_any
    fpt, peak = flops_per_token(model, cfg.seq_len), peak_flops(device)

    # Ctrl-C: finish the step in flight, save, exit; a second Ctrl-C stops at once
    stop = {"flag": False}

    def on_sigint(sig, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")
    old_handler = signal.signal(signal.SIGINT, on_sigint)

    log_f = open(out / "log.jsonl", "a") if master else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", disable=not master, dynamic_ncols=True)
    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            ce_sum = align_sum = 0.0
            tokens = 0
            for micro in range(cfg.grad_accum):
                b = {k: v.to(device) for k, v in next(batcher).items()}
                ids, mask, labels, task_ids = b["input_ids"], b["attention_mask"], b["labels"], b["task_ids"]
                # logits at position t predict token t+1: keep the positions whose next token is labelled
                sel = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
                targets = labels[:, 1:][sel[:, :-1]]
                sync = (not ddp) or micro == cfg.grad_accum - 1
                ctx_sync = fwd.no_sync() if ddp and not sync else contextlib.nullcontext()
                with ctx_sync:
                    with adapter_context(model, task_ids=task_ids, collect=align_on) as actx, \
                            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                        logits = fwd(ids, mask, logits_at=sel)
                    ce = F.cross_entropy(logits.float(), targets)
                    loss = ce
                    if align_on:
                        tmask = mask if cfg.align_tokens == "all" else (labels != -100)
                        la = alignment_loss(actx.a_outputs, tmask, task_ids, kind=cfg.align_loss,
                                            position_wise=cfg.align_position_wise)
                        loss = loss + cfg.align_lambda * la
                        align_sum += la.item()
                    (loss / cfg.grad_accum).backward()
                ce_sum += ce.item()
                tokens += int(mask.sum())
            ce_avg, align_avg = ce_sum / cfg.grad_accum, align_sum / cfg.grad_accum
            total = ce_avg + cfg.align_lambda * align_avg
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"loss is {total} at step {step + 1} (ce {ce_avg}, align {align_avg}); stopping without saving. "
                    f"The last good checkpoint is kept in {ckpt_dir}; lower --lr or --align-lambda and --resume")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            tokens *= world
            rec = {"step": step, "loss": total, "ce": ce_avg, "align": align_avg, "lr": lr, "tok_s": tokens / dt,
                   "mfu": (fpt * tokens / dt / (peak * world)) if peak else None, "mem_mb": memory_mb(device),
                   "ms": dt * 1000}
            log_tail = (log_tail + [rec])[-5:]
            if master:
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "-"
                    bar.write(f"step {step:5d} | loss {total:.4f} (ce {ce_avg:.4f}, align {align_avg:.4f}) | "
                              f"lr {lr:.2e} | {rec['tok_s']:,.0f} tok/s | mfu {mfu} | mem {rec['mem_mb']:,.0f} MB | "
                              f"{rec['ms']:.0f} ms")
                bar.update(1)
            if master and (step % cfg.ckpt_every == 0 or stop["flag"]):
                save_checkpoint(ckpt_dir, model, opt, step, batcher.state_dict(), cfg, log_tail)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and master and cfg.eval_max:
                acc = evaluate(model, tok, test_tasks, mode=cfg.eval_mode)
                bar.write(f"eval step {step}: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()))
            if stop["flag"]:
                say(f"saved {ckpt_dir} at step {step}; continue with the same command plus --resume")
                return None
    finally:
        bar.close()
        signal.signal(signal.SIGINT, old_handler)
        if log_f:
            log_f.close()
    if not master:
        return None
    save_checkpoint(ckpt_dir, model, opt, step, batcher.state_dict(), cfg, log_tail)
    save_adapter(model, out / "adapter")
    try:
        export_peft(model, out / "peft", base_model_name_or_path=cfg.model)
        say(f"saved {out / 'adapter'} (nanoalign) and {out / 'peft'} (PEFT LoRA)")
    except ValueError as e:  # router / per-task adapters are not a plain LoRA at inference
        say(f"saved {out / 'adapter'} (nanoalign); no PEFT export: {e}")
    result = {"config": dataclasses.asdict(cfg), "steps": step}
    if cfg.eval_max:
        after = evaluate(model, tok, test_tasks, mode=cfg.eval_mode)
        result.update(before=before, after=after)
        print(markdown_table({"before": before, "after": after},
                             title=f"\nper-task accuracy (%), {cfg.eval_max} test examples per task, {cfg.eval_mode}"))
        (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
