"""Tutorial 07 — what each adapter costs: trainable parameters, training step time, peak memory, inference overhead.

METHODS §7 claim 7: LoRA, Align-LoRA, MultiLoRA, M-LoRA (and HydraLoRA without router) merge into W0 and cost at
inference exactly what the base model costs; HydraLoRA, R-LoRA (router, N heads) and MTL-LoRA (per-task mixture) keep
paying. Align-LoRA's appendix D (Table 6, METHODS §4.2) reports Align-LoRA cheaper to train than HydraLoRA.

A "step" is train.py's per micro-batch work at its defaults (rank 8, α 32, 3 heads, dropout 0.1, gate/up/down) on
random tokens (B rows x T, last 8 labelled, one task per row): forward, cross-entropy (+ λ·alignment loss for
`align`), backward, AdamW. Peak memory is a process high-water mark, so each adapter runs in its own subprocess (CPU:
peak RSS after training minus after loading; CUDA: max_memory_allocated). Inference times base, unmerged and merged
forwards in turn; medians, noisy on a shared machine: compare adapters within one run; "merged vs base" is the noise.

    python tutorials/07_cost.py            # smollm2-135m, batch 4 x 64, 3 timed steps per adapter, CPU
    python tutorials/07_cost.py --tiny     # tiny random model (the smoke test)
    python tutorials/07_cost.py --full     # Qwen2.5-7B bf16, gradient checkpointing, batch 5 x 512 (the Align-LoRA
                                           # code's per-device batch), 10 steps; a GPU box
"""

# %% [setup]
import argparse
import json
import statistics
import subprocess
import sys
import time

from common import MLP, machine, parser, pyplot, save_figure, tiny_model_dir, write_json

import torch
import torch.nn as nn
import torch.nn.functional as F

import nanoalign.plumbing
from nanoalign.adapters import KINDS, adapter_context, adapter_modules, apply_adapter
from nanoalign.plumbing import system
from nanoalign.align import alignment_loss

p = parser(__doc__, full_model="qwen2.5-7b")
p.add_argument("--kinds", default=",".join(KINDS), help="comma list of adapter kinds (default: all)")
p.add_argument("--batch", type=int, default=None, help="rows per batch (default 4; --full 5)")
p.add_argument("--seq", type=int, default=None, help="tokens per row (default 64; --tiny 16; --full 512)")
p.add_argument("--steps", type=int, default=None, help="timed steps/forwards after one warm-up (default 3)")
p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (on with --full)")
p.add_argument("--in-process", action="store_true", help="measure every adapter in this process (quicker; peak "
               "memory is then shared, not per adapter)")
p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # measure one adapter (run in a subprocess)
args = p.parse_args()
args.grad_ckpt |= args.full
BATCH = args.batch or (5 if args.full else 4)
SEQ = args.seq or (16 if args.tiny else 512 if args.full else 64)
STEPS = args.steps or (2 if args.tiny else 10 if args.full else 3)
INFER_REPS = STEPS + 2                # eval forwards are cheaper than steps and their differences smaller
RANK, ALPHA, HEADS, DROPOUT, LAMBDA, ANSWER = 8, 32.0, 3, 0.1, 0.1, 8  # train.py's defaults; 8 labelled tokens/row


def timed(fn, device):
    """(wall s, CPU s of this process, all threads) of one call: CPU time is less disturbed by other jobs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w0, time.process_time() - c0


def plain_linear(m):
    """The base layer inside adapter m, as an nn.Linear sharing its frozen weight and bias (no copy)."""
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    lin.weight, lin.bias = m.weight, m.bias
    return lin


# %% [markdown]
# ## The measurement, for one adapter (runs in its own process)
# One eval forward (the memory baseline), the adapter, timed training steps. Then each adapted module in three
# versions (base nn.Linear sharing W0, adapter, merged W0 + ΔW) swapped in turn, rep after rep, so all three see the
# same machine load. Tests: tests/test_adapters.py::test_merge_equals_unmerged, ::test_merge_adapters_model,
# ::test_unmergeable_adapters_refuse, ::test_parameter_counts_match_methods_table.

# %%
def worker(kind):
    device = system.pick_device()
    torch.manual_seed(args.seed)
    model = nanoalign.plumbing.load_model(args.model, dtype=system.base_dtype(device), device=device).eval()
    n_base = sum(t.numel() for t in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(10, model.config.vocab_size - 10, (BATCH, SEQ), generator=g).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    task_ids = torch.arange(BATCH, device=device)             # one task per row (the alignment loss needs >= 2)
    at = torch.zeros_like(mask)
    at[:, -ANSWER - 1:-1] = True                              # positions predicting the last ANSWER tokens
    targets = ids[:, -ANSWER:].reshape(-1)
    last = torch.zeros_like(mask)
    last[:, -1] = True
    autocast = device.type == "cuda"

    def forward():
        with torch.no_grad(), adapter_context(model, task_ids=task_ids), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(ids, mask, logits_at=last).float()

    forward()
    mem_before = system.peak_memory_mib(device)

    torch.manual_seed(args.seed)
    apply_adapter(model, kind, rank=RANK, alpha=ALPHA, heads=HEADS, dropout=DROPOUT, targets=MLP, num_tasks=BATCH)
    model.gradient_checkpointing = args.grad_ckpt
    trainable = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    align = kind == "align"

    def step():
        with adapter_context(model, task_ids=task_ids, collect=align) as ctx:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(ids, mask, logits_at=at)
            loss = F.cross_entropy(logits.float(), targets)
            if align:
                loss = loss + LAMBDA * alignment_loss(ctx.a_outputs, mask, task_ids, kind="kl")
            loss.backward()  # inside the context: checkpointed blocks re-run the adapters here
        opt.step()
        opt.zero_grad(set_to_none=True)

    system.reset_peak_memory(device)
    model.train()
    step()  # warm-up (AdamW allocates its state here)
    steps = [timed(step, device) for _ in range(STEPS)]
    mem_train = system.peak_memory_mib(device)

    model.eval()
    mods = adapter_modules(model)
    versions = {"base": {n: plain_linear(m) for n, m in mods}, "unmerged": dict(mods)}
    try:
        versions["merged"] = {n: m.merge() for n, m in mods}
        refusal = None
    except ValueError as e:
        refusal = str(e)

    def use(version):
        for name, module in versions[version].items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)

    logits = {}
    for v in versions:  # warm-up, and the outputs to compare
        use(v)
        logits[v] = forward()
    times = {v: [] for v in versions}
    for _ in range(INFER_REPS):
        for v in versions:
            use(v)
            times[v].append(timed(forward, device))
    use("unmerged")
    med = lambda xs, i=0: statistics.median(x[i] for x in xs)  # noqa: E731
    paired = lambda v, i: statistics.median(a[i] / b[i] for a, b in zip(times[v], times["base"])) - 1  # noqa: E731
    return {"kind": kind, "trainable": sum(t.numel() for t in trainable), "base_params": n_base,
            "step_s": med(steps), "step_cpu_s": med(steps, 1), "step_all_s": [x[0] for x in steps],
            "tokens_per_s": BATCH * SEQ / med(steps), "mem_mb_after_load": mem_before, "mem_mb_peak_train": mem_train,
            "mem_mb_train_extra": mem_train - (mem_before if device.type == "cpu" else 0.0),
            "infer_s": {v: med(t) for v, t in times.items()}, "infer_cpu_s": {v: med(t, 1) for v, t in times.items()},
            "infer_all_s": {v: [x[0] for x in t] for v, t in times.items()},
            "overhead_wall": {v: paired(v, 0) for v in versions if v != "base"},
            "overhead_cpu": {v: paired(v, 1) for v in versions if v != "base"},
            "mergeable": refusal is None, "merge_refusal": refusal,
            "merge_max_abs_logit_diff": (logits["merged"] - logits["unmerged"]).abs().max().item()
            if refusal is None else None,
            "trained_max_abs_logit_shift": (logits["unmerged"] - logits["base"]).abs().max().item(),
            "device": str(device), "threads": torch.get_num_threads()}


if args.worker:
    print(json.dumps(worker(args.worker)))
    sys.exit(0)

# %% Every adapter, one subprocess each
t_start = time.perf_counter()
kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
if unknown := [k for k in kinds if k not in KINDS]:
    raise SystemExit(f"unknown adapter kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
model_name = str(tiny_model_dir()) if args.tiny else args.model
if not args.tiny:
    nanoalign.plumbing.load_tokenizer(model_name)  # resolve (and if needed fetch) the model once, before the workers
flags = ["--model", model_name, "--seed", str(args.seed), "--batch", str(BATCH), "--seq", str(SEQ),
         "--steps", str(STEPS)] + (["--grad-ckpt"] if args.grad_ckpt else [])
print(f"{model_name if not args.tiny else 'tiny random model'}: batch {BATCH} x {SEQ} tokens, rank {RANK}, "
      f"{HEADS} heads, {'/'.join(MLP)}; medians of {STEPS} steps and {INFER_REPS} forwards after 1 warm-up; "
      + ("all in this process" if args.in_process else "one subprocess per adapter"))
print(f"\n{'adapter':15s} {'trainable':>10s} {'step ms':>8s} {'cpu ms':>7s} {'+mem MB':>8s} | {'base fwd ms':>11s} "
      f"{'unmerged':>9s} {'merged':>7s}  (overhead vs base, wall / cpu)")
pct = lambda v: "n/a" if v is None else f"{100 * v:+.0f}%"  # noqa: E731
rows = {}
for kind in kinds:
    if args.in_process:
        args.model = model_name
        r = rows[kind] = worker(kind)
    else:
        res = subprocess.run([sys.executable, __file__, "--worker", kind, *flags], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{kind} worker failed:\n{res.stderr[-3000:]}")
        r = rows[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    ow, oc = r["overhead_wall"], r["overhead_cpu"]
    print(f"{kind:15s} {r['trainable']:10,d} {1000 * r['step_s']:8.0f} {1000 * r['step_cpu_s']:7.0f} "
          f"{r['mem_mb_train_extra']:8.0f} | {1000 * r['infer_s']['base']:11.0f} "
          f"{pct(ow['unmerged']):>5s}/{pct(oc['unmerged']):>5s} "
          f"{pct(ow.get('merged')):>5s}/{pct(oc.get('merged')):>5s}")

# %% [markdown]
# ## Summary: step time relative to LoRA; inference overhead over the base (a merged adapter *is* a base nn.Linear,
# so what "merged" shows is noise)

# %%
summary = {}
if "lora" in rows:
    ref = rows["lora"]
    for k, r in rows.items():
        summary[k] = {"step_vs_lora": r["step_s"] / ref["step_s"],
                      "step_cpu_vs_lora": r["step_cpu_s"] / ref["step_cpu_s"],
                      "trainable_vs_lora": r["trainable"] / ref["trainable"],
                      "mem_extra_vs_lora": r["mem_mb_train_extra"] / ref["mem_mb_train_extra"]
                      if ref["mem_mb_train_extra"] > 0 else None,
                      **{f"{v}_overhead_{w}": r[f"overhead_{w}"].get(v) for v in ("unmerged", "merged")
                         for w in ("wall", "cpu")}, "mergeable": r["mergeable"]}
    print("\nstep time vs lora (wall / cpu): " + ", ".join(
        f"{k} {v['step_vs_lora']:.2f}/{v['step_cpu_vs_lora']:.2f}x" for k, v in summary.items()))
noise = max((abs(r["overhead_wall"]["merged"]) for r in rows.values() if "merged" in r["overhead_wall"]), default=None)
if noise is not None:
    print(f"noise level (largest |merged − base| wall difference): {100 * noise:.0f}%")
results = {"meta": machine(), "model": model_name if not args.tiny else "tiny", "batch": BATCH, "seq": SEQ,
           "steps": STEPS, "infer_reps": INFER_REPS, "rank": RANK, "alpha": ALPHA, "heads": HEADS, "dropout": DROPOUT,
           "targets": list(MLP), "align_lambda": LAMBDA, "grad_ckpt": args.grad_ckpt,
           "memory_per_adapter": not args.in_process,
           "note": "shared machine: timings are noisy; compare adapters within one run",
           "noise_merged_vs_base_max": noise, "adapters": rows, "summary": summary,
           "wall_s": round(time.perf_counter() - t_start, 1)}
print(f"\nwrote {write_json(args.out / '07_cost.json', results)} ({results['wall_s']} s)")

plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    ks = list(rows)
    med = [1000 * rows[k]["step_s"] for k in ks]
    lo = [m - 1000 * min(rows[k]["step_all_s"]) for m, k in zip(med, ks)]
    hi = [1000 * max(rows[k]["step_all_s"]) - m for m, k in zip(med, ks)]
    bars = ax[0].bar(ks, med, yerr=[lo, hi], capsize=3, color="tab:blue")
    ax[0].bar_label(bars, [f"{rows[k]['trainable'] / 1e6:.2f}M" for k in ks], fontsize=7, label_type="center",
                    color="white")
    ax[0].set_ylabel("ms per training step (median, min-max)")
    ax[0].set_title(f"step, batch {BATCH}x{SEQ} (labels: trainable)", fontsize=10)
    ax[1].bar(ks, [rows[k]["mem_mb_train_extra"] for k in ks], color="tab:green")
    ax[1].set_ylabel("MB over the loaded model")
    ax[1].set_title("training memory" + (" (shared process!)" if args.in_process else ""), fontsize=10)
    for j, (v, lab) in enumerate([("unmerged", "unmerged"), ("merged", "merged (true cost: 0)")]):
        vals = [100 * rows[k]["overhead_wall"][v] if v in rows[k]["overhead_wall"] else 0 for k in ks]
        ax[2].bar([i + (j - 0.5) * 0.4 for i in range(len(ks))], vals, 0.4, label=lab)
    ax[2].axhline(0, color="black", lw=0.8)
    ax[2].set_ylabel("eval forward time vs base (%)")
    ax[2].set_title("inference overhead (no orange: cannot merge)", fontsize=10)
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(range(len(ks)), ks, rotation=30, ha="right")
    where = results["meta"]["cuda"] or f"{results['meta']['cpu_count']} shared CPU cores (timings noisy)"
    fig.suptitle(f"07 cost on {'the tiny model' if args.tiny else model_name}, {where}", fontsize=10)
    print(f"wrote {save_figure(fig, args.out / '07_cost.png')}")
