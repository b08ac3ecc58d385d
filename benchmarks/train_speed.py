"""Training speed and memory: nanoalign vs Hugging Face transformers + PEFT, same model, batch and adapter.

    python benchmarks/train_speed.py                          # CPU: smollm2-135m (real weights), 8 x 128
    python benchmarks/train_speed.py --config qwen2.5-0.5b --seq 1024 --batch 8 --grad-ckpt   # CUDA, random weights
    python benchmarks/train_speed.py --suite gpu --out benchmarks/RESULTS-gpu.md    # all GPU rows (or gpu-0.5b/-7b)
    python benchmarks/train_speed.py --suite gpu --dry-run    # the same rows on a tiny config, CPU, seconds

Each (implementation, adapter) runs in its own subprocess, so its peak memory is its own; medians over alternating
repeats. A step is forward + backward + AdamW on a batch whose last `--answer` tokens per row carry labels: nanoalign
on the trainer's sync-free path, HF with full logits as `model(..., labels=...)` gives a PEFT user; `align` uses the
same loss on both (hooked lora_A outputs for HF, as the Align-LoRA code does).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoalign.plumbing import system  # noqa: E402  (before torch: nanoalign sets OMP_WAIT_POLICY, as in train.py)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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
# --suite: (config, seq, batch) cells, each with and without --grad-ckpt
SUITES = {"gpu-0.5b": [("qwen2.5-0.5b", 1024, 8)], "gpu-7b": [("qwen2.5-7b", 4096, 2)]}
SUITES["gpu"] = SUITES["gpu-0.5b"] + SUITES["gpu-7b"]
SUITE_ADAPTERS = "lora,hydra,mlora,align"
HF_ADAPTERS = ("lora", "align")  # PEFT has no multi-head LoRA


def model_dir_or_config(name):
    """smollm2-135m: the converted real checkpoint directory; other names: a config dict for random weights."""
    if name == "smollm2-135m":
        from nanoalign.plumbing.embedded import ensure_smollm2
        return ensure_smollm2(), None
    return None, CONFIGS[name]


def make_batch(batch, seq, answer, vocab):
    """CPU tensors: ids, an all-ones mask and labels on the last `answer` tokens of each row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 10, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return ids, torch.ones_like(ids, dtype=torch.bool), labels


def kind_of(adapter):
    return "align" if adapter.startswith("align") else adapter  # align-mmd: A-LoRA-M


def build_nanoalign(args, device, dtype):
    from nanoalign.adapters import apply_adapter
    from nanoalign.model import CausalLM, ModelConfig
    from nanoalign.plumbing.fast import install
    path, cfg = model_dir_or_config(args.config)
    if path is not None:
        model = CausalLM.from_pretrained(path, dtype=dtype, device=device)
    else:
        with torch.device(device):
            model = CausalLM(ModelConfig.from_hf_dict(cfg)).to(dtype)
    apply_adapter(model, kind_of(args.adapter), rank=args.rank, alpha=2 * args.rank, targets=ALL_LINEAR,
                  heads=args.heads)
    model.gradient_checkpointing = args.grad_ckpt
    return install(model)  # the fast forms train.py installs


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
    return model


def measure(args):
    """One (implementation, adapter) run: {"step_s": median step seconds, "mem_mib": peak memory}."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype, autocast = system.base_dtype(device), system.use_autocast(device)
    model = build_nanoalign(args, device, dtype) if args.impl == "nanoalign" else build_hf(args, device, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the adapter trains in fp32 over a bf16 base (CUDA), on both
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    vocab = (model.config.vocab_size if args.impl == "nanoalign" else model.base_model.model.config.vocab_size)
    ids, mask, labels = make_batch(args.batch, args.seq, args.answer, vocab)
    tasks = torch.arange(args.batch) % args.tasks
    loss_kind = "mmd" if args.adapter == "align-mmd" else "kl"
    align = args.adapter.startswith("align")
    from nanoalign.plumbing.fast import alignment_loss  # the trainer's sync-free form
    if args.impl == "nanoalign":
        from nanoalign.adapters import adapter_context
        from nanoalign.data import answer_positions
        from nanoalign.plumbing.fast import logit_indices
        at, targets = answer_positions(labels)
        idx = logit_indices(at)  # on the host, before the copy: no sync, one shape
        ids, mask, idx, targets, tasks = (t.to(device) for t in (ids, mask, idx, targets, tasks))

        def loss_fn():
            with adapter_context(model, task_ids=tasks, collect=align) as ctx, \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(ids, mask, logits_at=idx, right_padded=True)
            return F.cross_entropy(logits.float(), targets), ctx.a_outputs
    else:
        ids, mask, labels, tasks = (t.to(device) for t in (ids, mask, labels, tasks))
        store = {}
        for name, mod in model.named_modules() if align else ():  # what the Align-LoRA code does on top of PEFT
            if name.endswith("lora_A.default"):
                mod.register_forward_hook(lambda m, i, o, n=name: store.__setitem__(n, o))

        def loss_fn():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss, dict(store)

    def step():
        loss, a_outputs = loss_fn()
        if align:  # the same loss function on both: only the plumbing differs
            loss = loss + 0.1 * alignment_loss(a_outputs, mask, tasks, kind=loss_kind, num_tasks=args.tasks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    system.reset_peak_memory(device)  # the measured steps' peak (CPU: the process's max RSS, not resettable)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "mem_mib": system.peak_memory_mib(device)}


def step_flops(args, impl):
    """FLOPs of one step by system.flops_per_token (HF's full logits count as done), on a meta-device model."""
    from nanoalign.adapters import apply_adapter
    from nanoalign.model import CausalLM, ModelConfig
    path, cfg = model_dir_or_config(args.config)
    cfg = cfg if cfg is not None else json.loads((path / "config.json").read_text())
    with torch.device("meta"):
        model = apply_adapter(CausalLM(ModelConfig.from_hf_dict(cfg)), kind_of(args.adapter),
                              rank=args.rank, targets=ALL_LINEAR, heads=args.heads)
    logits = args.batch * (args.answer if impl == "nanoalign" else args.seq)  # HF: full logits
    return system.flops_per_token(model, [args.seq] * args.batch, logit_positions=logits) * args.batch * args.seq


def run(args, impl, adapter):
    """measure() in a fresh subprocess (or in this process for --dry-run); None when it ran out of memory."""
    if args.dry_run:
        try:
            return measure(argparse.Namespace(**{**vars(args), "impl": impl, "adapter": adapter}))
        except torch.OutOfMemoryError:
            return None
    keep = ["config", "device", "batch", "seq", "answer", "rank", "heads", "tasks", "steps", "warmup"]
    cmd = [sys.executable, __file__, "--impl", impl, "--adapter", adapter]
    cmd += [x for k in keep for x in (f"--{k}", str(getattr(args, k)))] + (["--grad-ckpt"] if args.grad_ckpt else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode and "out of memory" in res.stderr.lower():
        return None
    if res.returncode:
        raise SystemExit(f"{impl}/{adapter} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(args):
    """Run every (implementation, adapter) of one configuration; the markdown tables of timings and targets."""
    adapters = args.adapters.split(",")
    results = {}
    for rep in range(args.repeats):
        for a in adapters:
            impls = ["nanoalign"] + (["hf"] if a in HF_ADAPTERS else [])
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                results.setdefault((impl, a), []).append(run(args, impl, a))
    tokens = args.batch * args.seq
    cuda = torch.device(args.device).type == "cuda"
    peak = system.peak_flops(args.device) if cuda else None

    def row(impl, a):
        rs = [r for r in results[(impl, a)] if r is not None]
        if not rs:
            return None
        step = statistics.median(r["step_s"] for r in rs)
        mem = statistics.median(r["mem_mib"] for r in rs)
        flops = step_flops(argparse.Namespace(**{**vars(args), "adapter": a}), impl)
        return step, mem, flops / step / peak if peak else None

    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lines = [f"### {args.config}, batch {args.batch} x seq {args.seq}, rank {args.rank} (all linear), "
             f"{'grad-ckpt' if args.grad_ckpt else 'no ckpt'}, {args.device}" + (" (DRY RUN)" if args.dry_run else ""),
             "", f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
             + (f", {torch.cuda.get_device_name()}" if cuda else f", {torch.get_num_threads()} threads")
             + f"; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, load average at end {load}",
             f"medians of {args.repeats} runs x {args.steps} steps, after {args.warmup} warm-up steps; "
             f"{args.answer} labelled tokens per row; MFU by nanoalign.plumbing.system (peak "
             + (f"{peak / 1e12:.0f} TFLOP/s bf16 dense)" if peak else "unknown: CPU or unlisted GPU)"), "",
             "| adapter | impl | tok/s | step ms | peak mem MiB | MFU | speed vs HF | mem vs HF | step vs our lora |",
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
            mfu = f"{100 * mfu:.1f}%" if mfu is not None else "-"
            lines.append(f"| {a} | {name} | {tokens / step:,.0f} | {1000 * step:.0f} | {mem:,.0f} | {mfu} | {vs} | "
                         f"{mvs} | {rel} |")
    lines += targets(args, rows, lora_step, cuda)
    return "\n".join(lines)


def targets(args, rows, lora_step, cuda):
    """The issue's targets, where this run measured them, as a markdown table (or nothing)."""
    checks = []
    speed_goal, mem_goal = (1.5, 0.7) if cuda else (1.3, 0.8)
    for a in HF_ADAPTERS:
        if rows.get(("nanoalign", a)) and rows.get(("hf", a)):
            (s, m, _), (hs, hm, _) = rows[("nanoalign", a)], rows[("hf", a)]
            checks.append((f"{a}: tok/s nanoalign / HF+PEFT >= {speed_goal}", hs / s, hs / s >= speed_goal))
            if not cuda or args.grad_ckpt:
                checks.append((f"{a}: peak memory nanoalign / HF+PEFT <= {mem_goal}", m / hm, m / hm <= mem_goal))
    for a in ("hydra", "mlora", "rlora"):
        if rows.get(("nanoalign", a)) and lora_step:
            r = rows[("nanoalign", a)][0] / lora_step
            checks.append((f"{a} (3 heads) step / lora step <= 1.15", r, r <= 1.15))
    if rows.get(("nanoalign", "align")) and lora_step:
        share = 1 - lora_step / rows[("nanoalign", "align")][0]
        checks.append(("alignment loss share of the align step <= 5%", share, share <= 0.05))
    if rows.get(("nanoalign", "align-mmd")) and rows.get(("nanoalign", "align")):
        r = rows[("nanoalign", "align-mmd")][0] / rows[("nanoalign", "align")][0]
        checks.append(("MMD align step / KL align step <= 1.25", r, r <= 1.25))
    lora = rows.get(("nanoalign", "lora"))
    if cuda and args.config == "qwen2.5-0.5b" and args.seq == 1024 and lora and lora[2] is not None:
        checks.append(("lora MFU >= 40%", lora[2], lora[2] >= 0.40))
    if cuda and args.config == "qwen2.5-7b" and args.seq == 4096 and ("nanoalign", "lora") in rows:
        checks.append(("qwen2.5-7b lora at seq 4096 fits", float(lora is not None), lora is not None))
    if not checks:
        return []
    return ["", "| target | measured | met |", "|---|---:|---|"] + [
        f"| {t} | {'yes' if v else 'no'} | {'yes' if ok else 'no'} |" if "fits" in t else
        f"| {t} | {v:.1%} | {'yes' if ok else 'no'} |" if "%" in t else
        f"| {t} | {v:.2f}x | {'yes' if ok else 'no'} |" for t, v, ok in checks]


def append(path, text):
    """Append `text` to the markdown file at `path`, atomically."""
    path = Path(path)
    system.write_atomic(path, (path.read_text() if path.exists() else "") + text + "\n\n")


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
    p.add_argument("--adapters", default="lora,hydra,mlora,align,align-mmd")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--suite", choices=list(SUITES), help="run the GPU rows of RESULTS.md (SUITES), with and without "
                   "--grad-ckpt; --config/--seq/--batch/--grad-ckpt/--adapters are then taken from the suite")
    p.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU, 1 step, in this process: "
                   "checks the script end to end in seconds, measures nothing")
    p.add_argument("--out", default=None, help="also append the markdown tables to this file")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(measure(args)))
        return
    if args.dry_run:
        args.device, args.steps, args.warmup, args.repeats = "cpu", 1, 0, 1
    cells = [(args.config, args.seq, args.batch, args.grad_ckpt, args.adapters)]
    if args.suite:
        cells = [(c, s, b, ck, SUITE_ADAPTERS) for c, s, b in SUITES[args.suite] for ck in (False, True)]
    for config, seq, batch, ckpt, adapters in cells:
        cell = argparse.Namespace(**{**vars(args), "config": config, "seq": seq, "batch": batch, "grad_ckpt": ckpt,
                                     "adapters": adapters})
        if args.dry_run:  # the cell's structure on a tiny model
            cell.config, cell.seq, cell.batch, cell.answer = "tiny", min(seq, 32), min(batch, 4), min(args.answer, 8)
        text = table(cell)
        print(text + "\n", flush=True)
        if args.out:
            append(args.out, text)


if __name__ == "__main__":
    main()
