"""Training speed and memory: nanoalign vs Hugging Face transformers + PEFT, same model, batch and adapter.

    python benchmarks/train_speed.py                          # CPU: smollm2-135m (real weights), 8 x 128
    python benchmarks/train_speed.py --config qwen2.5-0.5b --seq 1024 --batch 8 --grad-ckpt   # CUDA, random weights
    python benchmarks/train_speed.py --device cpu --config tiny --steps 1 --repeats 1        # the same code, tiny

GPU rows of RESULTS.md: --config qwen2.5-0.5b | qwen2.5-7b, --seq 1024 | 4096, with and without --grad-ckpt, on a
CUDA device (bf16 frozen base, fp32 adapters and AdamW state, bf16 autocast, fused AdamW).

Each (implementation, adapter) runs in its own subprocess, so peak memory (RSS on CPU, max_memory_allocated on CUDA)
belongs to that run alone; the runs alternate nanoalign / HF and repeat `--repeats` times, and the table reports
medians. A step is forward + backward + AdamW over adapter parameters, on a batch with no padding whose last
`--answer` tokens of each row carry labels (prompt tokens are masked, as in multi-task SFT). nanoalign computes logits
only at labelled positions; HF computes the full logits, as `model(..., labels=...)` does: that is what a PEFT user
gets, and part of what is measured. Both: same weights and dtype, dropout 0, the same labelled tokens, and for
`align` the same loss function (on hooked lora_A outputs for HF, as the Align-LoRA code does). A run that fails with
out-of-memory is reported as OOM. The second table checks the issue's targets (the 3-head and alignment rows
compare nanoalign with its own plain LoRA: alignment share = 1 - step(lora) / step(align)).

FLOPs for MFU (CUDA only) follow STYLE.md: 4·N_frozen + 6·N_lora + 12·L·T·d_attn per token.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the machine may be shared
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# HF configs of the GPU models (random weights: no hub on the GPU machine)
CONFIGS = {
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2,
                         rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, vocab_size=151936,
                         max_position_embeddings=32768, hidden_act="silu"),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, vocab_size=152064,
                       max_position_embeddings=32768, hidden_act="silu"),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                 vocab_size=512, tie_word_embeddings=True, hidden_act="silu"),
}


def model_dir_or_config(name):
    """smollm2-135m: the converted real checkpoint directory; other names: a config dict for random weights."""
    if name == "smollm2-135m":
        from nanoalign.embedded import ensure_smollm2
        return ensure_smollm2(), None
    return None, CONFIGS[name]


def make_batch(batch, seq, answer, vocab, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 10, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    mask = torch.ones_like(ids, dtype=torch.bool)
    return ids.to(device), mask.to(device), labels.to(device)


def build_nanoalign(args, device, dtype):
    from nanoalign.adapters import apply_adapter
    from nanoalign.model import CausalLM, ModelConfig
    path, cfg = model_dir_or_config(args.config)
    if path is not None:
        model = CausalLM.from_pretrained(path, dtype=dtype, device=device)
    else:
        with torch.device(device):
            model = CausalLM(ModelConfig.from_hf_dict(cfg)).to(dtype)
    kind = "align" if args.adapter == "align" else args.adapter
    apply_adapter(model, kind, rank=args.rank, alpha=2 * args.rank, targets=ALL_LINEAR, heads=args.heads)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.gradient_checkpointing = args.grad_ckpt
    return model


def build_hf(args, device, dtype):
    import transformers
    from peft import LoraConfig, get_peft_model
    path, cfg = model_dir_or_config(args.config)
    if path is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(ALL_LINEAR),
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def hf_align_hooks(model, store):
    """What the original Align-LoRA code does on top of PEFT: forward hooks on every lora_A storing its output."""
    for name, mod in model.named_modules():
        if name.endswith("lora_A.default"):
            mod.register_forward_hook(lambda m, i, o, n=name: store.__setitem__(n, o))


def worker(args):
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = device.type == "cuda"
    model = build_nanoalign(args, device, dtype) if args.impl == "nanoalign" else build_hf(args, device, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    vocab = (model.config.vocab_size if args.impl == "nanoalign" else model.base_model.model.config.vocab_size)
    ids, mask, labels = make_batch(args.batch, args.seq, args.answer, vocab, device)
    task_ids = torch.arange(args.batch, device=device) % args.tasks
    align = args.adapter == "align"
    if args.impl == "nanoalign":
        from nanoalign.adapters import adapter_context
        from nanoalign.align import alignment_loss
        from nanoalign.data import answer_positions
        sel, targets = answer_positions(labels)

        def step():
            with adapter_context(model, task_ids=task_ids, collect=align) as ctx, \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(ids, mask, logits_at=sel)
            loss = F.cross_entropy(logits.float(), targets)
            if align:
                loss = loss + 0.1 * alignment_loss(ctx.a_outputs, mask, task_ids, kind="kl")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from nanoalign.align import alignment_loss
        store = {}
        if align:
            hf_align_hooks(model, store)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
            if align:  # the same loss function on the hooked A-outputs, so only the plumbing differs
                loss = loss + 0.1 * alignment_loss(dict(store), mask, task_ids, kind="kl")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and p.ndim == 2
                 and "layers" in n)
    n_lora = sum(p.numel() for p in trainable)
    print(json.dumps({"step_s": statistics.median(times), "mem_mb": mem, "frozen": frozen, "lora": n_lora}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="smollm2-135m", choices=["smollm2-135m", *CONFIGS])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--answer", type=int, default=16, help="labelled tokens at the end of each row")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--tasks", type=int, default=4, help="task groups in the batch for the alignment loss")
    p.add_argument("--adapters", default="lora,hydra,mlora,align")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="also append the markdown table to this file")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)

    def run(impl, adapter):
        keep = ["config", "device", "batch", "seq", "answer", "rank", "heads", "tasks", "steps", "warmup"]
        cmd = [sys.executable, __file__, "--impl", impl, "--adapter", adapter]
        cmd += [x for k in keep for x in (f"--{k}", str(getattr(args, k)))] + (["--grad-ckpt"] if args.grad_ckpt else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode and "out of memory" in res.stderr.lower():
            return None
        if res.returncode:
            raise SystemExit(f"{impl}/{adapter} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    adapters = args.adapters.split(",")
    results = {}
    for _ in range(args.repeats):
        for a in adapters:
            impls = ["nanoalign"] + (["hf"] if a in ("lora", "align") else [])  # PEFT has no multi-head LoRA
            for impl in (impls if _ % 2 == 0 else impls[::-1]):
                results.setdefault((impl, a), []).append(run(impl, a))
    tokens = args.batch * args.seq
    peak = None
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = 989e12 if ("H100" in name or "H200" in name) else None
    from nanoalign.model import ModelConfig
    _, cfg = model_dir_or_config(args.config)
    if cfg is None:
        path, _ = model_dir_or_config(args.config)
        cfg = json.loads((path / "config.json").read_text())
    mc = ModelConfig.from_hf_dict(cfg)
    attn = 12 * mc.num_hidden_layers * args.seq * mc.num_attention_heads * mc.head_dim

    def row(impl, a):
        rs = [r for r in results[(impl, a)] if r is not None]
        if not rs:
            return None
        step = statistics.median(r["step_s"] for r in rs)
        mem = statistics.median(r["mem_mb"] for r in rs)
        fpt = 4 * rs[0]["frozen"] + 6 * rs[0]["lora"] + attn
        mfu = f"{100 * fpt * tokens / step / peak:.1f}%" if peak else "-"
        return step, mem, mfu

    cuda = args.device.startswith("cuda")
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines = [f"### {args.config}, batch {args.batch} x seq {args.seq}, rank {args.rank} (all linear), "
             f"{'grad-ckpt' if args.grad_ckpt else 'no ckpt'}, {args.device}",
             "", f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
             + (f", {torch.cuda.get_device_name()}" if cuda else f", {torch.get_num_threads()} threads")
             + f"; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, load average at end {load}",
             f"medians of {args.repeats} runs x {args.steps} steps, after {args.warmup} warm-up steps; "
             f"{args.answer} labelled tokens per row", "",
             "| adapter | impl | tok/s | step ms | peak mem MB | MFU | speed vs HF | mem vs HF | step vs our lora |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {k: row(*k) for k in results}
    lora_step = rows[("nanoalign", "lora")][0] if rows.get(("nanoalign", "lora")) else None
    for a in adapters:
        for impl in ("nanoalign", "hf"):
            if (impl, a) not in rows:
                continue
            name = impl if impl == "nanoalign" else "HF+PEFT"
            if rows[(impl, a)] is None:
                lines.append(f"| {a} | {name} | OOM | - | - | - | - | - | - |")
                continue
            step, mem, mfu = rows[(impl, a)]
            vs = mvs = "-"
            if impl == "nanoalign" and rows.get(("hf", a)):
                hs, hm, _ = rows[("hf", a)]
                vs, mvs = f"{hs / step:.2f}x", f"{mem / hm:.2f}x"
            rel = f"{step / lora_step:.2f}x" if impl == "nanoalign" and lora_step else "-"
            lines.append(f"| {a} | {name} | {tokens / step:,.0f} | "
                         f"{1000 * step:.0f} | {mem:,.0f} | {mfu} | {vs} | {mvs} | {rel} |")

    # the targets, where this run measured them
    checks = []
    speed_goal, mem_goal = (1.5, 0.7) if cuda else (1.3, 0.8)
    for a in ("lora", "align"):
        if rows.get(("nanoalign", a)) and rows.get(("hf", a)):
            (s, m, _), (hs, hm, _) = rows[("nanoalign", a)], rows[("hf", a)]
            checks.append((f"{a}: tok/s nanoalign / HF+PEFT >= {speed_goal}", hs / s, hs / s >= speed_goal))
            if not cuda or args.grad_ckpt:
                checks.append((f"{a}: peak memory nanoalign / HF+PEFT <= {mem_goal}", m / hm, m / hm <= mem_goal))
    for a in ("hydra", "mlora"):
        if rows.get(("nanoalign", a)) and lora_step:
            r = rows[("nanoalign", a)][0] / lora_step
            checks.append((f"{a} (3 heads) step / lora step <= 1.15", r, r <= 1.15))
    if rows.get(("nanoalign", "align")) and lora_step:
        share = 1 - lora_step / rows[("nanoalign", "align")][0]
        checks.append(("alignment loss share of the align step <= 5%", share, share <= 0.05))
    if cuda and peak and args.config == "qwen2.5-0.5b" and args.seq == 1024 and rows.get(("nanoalign", "lora")):
        mfu = float(rows[("nanoalign", "lora")][2].rstrip("%")) / 100
        checks.append(("lora MFU >= 40%", mfu, mfu >= 0.40))
    if checks:
        lines += ["", "| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {t} | {v:.1%} | {'yes' if ok else 'no'} |" if "%" in t else
                  f"| {t} | {v:.2f}x | {'yes' if ok else 'no'} |" for t, v, ok in checks]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()
