"""Tutorial 02 — the multi-head LoRA family side by side (METHODS.md §2.3–2.8).

    hydra            h = W0 x + s·Σ_i ω_i(x) B_i A drop(x),  ω = softmax(W_r x)   HydraLoRA: zero heads + router
    hydra-norouter   h = W0 x + s·Σ_i B_i A drop(x)                              its ablation without router
    rlora            h = W0 x − C x + s·Σ_i ω_i(x) B_i drop_i(A x)               R-LoRA: random heads, per-head dropout
    mlora            h = W0 x − C x + s·Σ_i B_i drop_i(A x)                      M-LoRA: R-LoRA without router
    mtl              h = W0 x + s·(Σ_j softmax(w_t/τ)_j B_j) Λ_t A drop(x)        MTL-LoRA: task t's transform and mix
    multilora        h = W0 x + s·Σ_i diag(g_i) B_i A_i drop(x)                  MultiLoRA: n full pairs, zero scales

At the Align-LoRA Table 1 setting (rank 4, 3 heads, gate/up/down, METHODS §1): each one's parameters and their
count, whether it starts as the base model and can merge into W0, and whether its heads stay alike over a few steps
on a real task mix: the mechanism behind the "multi-head paradox" (METHODS §7 claims 1-2).

    python tutorials/02_multi_head_family.py           # smollm2-135m on CPU, 5 steps per adapter
    python tutorials/02_multi_head_family.py --tiny    # tiny random model, 3 steps (the smoke test)
    python tutorials/02_multi_head_family.py --full    # Qwen2.5-3B (Align-LoRA Table 1's model), 20 steps; GPU box
"""

# %% [setup]
import copy
import math
import time

from common import MLP, QWEN25_3B, head_cos, lm_loss, load_base, machine, parser, pick_data, pyplot, save_figure, \
    write_json

import torch
import torch.nn as nn

from nanoalign.adapters import adapter_context, adapter_modules, apply_adapter, count_trainable, merge_adapters
from nanoalign.data import BalancedBatcher, encode_tasks
from nanoalign.model import CausalLM, ModelConfig
from nanoalign.plumbing.datasets import load_tasks

p = parser(__doc__, full_model="qwen2.5-3b")
p.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default 5; 3 with --tiny)")
p.add_argument("--data", default=None, help="task mix (default: sst2,cola,piqa,siqa,openbookqa from --source when "
               "present, else the builtin suite; --tiny: builtin)")
p.add_argument("--source", default=None, help="original benchmark files (default $NANOALIGN_DATA or ../shared/data)")
args = p.parse_args()
STEPS = args.steps or (3 if args.tiny else 20 if args.full else 5)
RANK, HEADS, ALPHA, DROPOUT, LR = 4, 3, 32.0, 0.1, 2e-3   # Table 1 shape; α, dropout, lr as train.py's defaults
KINDS = ["lora", "hydra", "hydra-norouter", "rlora", "mlora", "mtl", "multilora"]  # lora: the reference
t_start = time.perf_counter()
model, tok, model_name = load_base(args)
DATA, DATA_DIR = pick_data(args)
tasks = load_tasks(DATA, "train", data_dir=DATA_DIR, max_per_task=64, seed=args.seed)
batches = BalancedBatcher(encode_tasks(tok, tasks, 128), per_task=1, seed=args.seed, pad_id=tok.pad_id)
task_names, NUM_TASKS = sorted(tasks), len(tasks)  # a task's position here is its task id
results = {"meta": machine(), "model": model_name, "rank": RANK, "heads": HEADS, "alpha": ALPHA, "dropout": DROPOUT,
           "targets": list(MLP), "data": DATA, "tasks": task_names}


def adapt(module, kind, seed=args.seed, **kw):
    """apply_adapter with this tutorial's settings (the same seed for every kind: same A where A is kaiming)."""
    torch.manual_seed(seed)
    return apply_adapter(module, kind, rank=RANK, alpha=ALPHA, heads=HEADS, dropout=DROPOUT, targets=MLP,
                         num_tasks=NUM_TASKS, **kw)


# %% [markdown]
# ## 1. One layer, one input, seven adapters: trainable tensors, output change at init, A-output shape, mergeable
# Zero heads and MultiLoRA's zero scales start exactly at the base; M-LoRA's compensation C = s·Σ_i B_i⁰A⁰ cancels
# its random heads to round-off; R-LoRA's C assumes a uniform router (ω_i = 1/N, as the released code), which its
# kaiming router is not. A router (ΔW depends on x) or MTL-LoRA's task mix (ΔW depends on t) cannot merge.
# Tests: tests/test_adapters.py::test_forward_matches_reference_equation (every equation above),
# ::test_zero_init_leaves_layer_unchanged, ::test_random_init_heads_differ_and_compensation,
# ::test_merge_equals_unmerged, ::test_unmergeable_adapters_refuse.

# %%
cfg = model.config
d_in, d_out = cfg.hidden_size, cfg.intermediate_size
torch.manual_seed(args.seed)
base = nn.Linear(d_in, d_out, bias=False)
x = torch.randn(NUM_TASKS, 7, d_in)                 # 5 samples x 7 tokens; sample i belongs to task i
task_ids = torch.arange(NUM_TASKS)
with torch.no_grad():
    y_base = base(x)
one_layer = results["one_layer"] = {}
print(f"\n[1] one {d_in}->{d_out} layer, rank {RANK}, {HEADS} heads, {NUM_TASKS} tasks")
print(f"    {'kind':15s} {'trainable':>9s}  {'tensors':50s} {'init |h-base|':>13s}  {'A-output':>12s}  merge")
for kind in KINDS:
    holder = nn.Module()
    holder.up_proj = copy.deepcopy(base)
    adapt(holder, kind)
    m = holder.up_proj.eval()
    with torch.no_grad(), adapter_context(holder, task_ids=task_ids, collect=True) as ctx:
        init_diff = (m(x) - y_base).abs().max().item()
    try:
        m.merge()
        merge = "yes"
    except ValueError as e:
        merge = f"no: {str(e).split(': ', 1)[1]}"
    tensors = {n.replace(".weight", ""): list(t.shape) for n, t in m.named_parameters() if t.requires_grad}
    one_layer[kind] = {"trainable": count_trainable(holder), "tensors": tensors, "init_max_abs_diff": init_diff,
                       "a_output_shape": list(ctx.a_outputs["up_proj"].shape), "mergeable": merge == "yes",
                       "merge_message": merge, "uses_task_id": m.needs_task_ids}
    shape_txt = ", ".join(f"{n.replace('lora_', '')}{t}" for n, t in tensors.items())
    print(f"    {kind:15s} {count_trainable(holder):9,d}  {shape_txt:50s} {init_diff:13.2e}  "
          f"{str(list(ctx.a_outputs['up_proj'].shape[-1:])):>12s}  {merge}")

# %% [markdown]
# ## 2. Parameter counts on meta-device models, against METHODS §1's Qwen2.5-3B counts
# Tests: tests/test_adapters.py::test_parameter_counts_match_methods_table, ::test_hydra_router_not_counted_equals_
# mlora_count.

# %%
METHODS_QWEN3B = {"mlora": 12_570_624, "hydra": 14_201_856, "rlora": 14_201_856}


def meta_counts(config):
    counts = {}
    for kind in KINDS:
        with torch.device("meta"):
            m = CausalLM(config)
        n_base = sum(t.numel() for t in m.parameters())
        adapt(m, kind)
        counts[kind] = {"trainable": count_trainable(m), "base": n_base, "percent": 100 * count_trainable(m) / n_base}
    return counts


counts = results["param_counts"] = {"smollm2-135m" if not args.tiny else "tiny": meta_counts(cfg),
                                    "qwen2.5-3b": meta_counts(ModelConfig.from_hf_dict(QWEN25_3B))}
print(f"\n[2] trainable parameters (rank {RANK}, {HEADS} heads, {'/'.join(MLP)}; mtl with {NUM_TASKS} tasks)")
names = list(counts)
print(f"    {'kind':15s} " + "  ".join(f"{n:>22s}" for n in names) + "   METHODS §1 (Qwen2.5-3B)")
for kind in KINDS:
    cells = "  ".join(f"{counts[n][kind]['trainable']:>13,d} ({counts[n][kind]['percent']:.3f}%)" for n in names)
    ref, ours = METHODS_QWEN3B.get(kind), counts["qwen2.5-3b"][kind]["trainable"]
    check = "" if ref is None else f"{ref:,} ({'match' if ours == ref else 'MISMATCH'})"
    print(f"    {kind:15s} {cells}   {check}")
results["methods_qwen3b_match"] = {k: counts["qwen2.5-3b"][k]["trainable"] == v for k, v in METHODS_QWEN3B.items()}

# %% [markdown]
# ## 3. On the real model: starting point, a few optimizer steps, and merging
# Same base, batches (one example per task) and AdamW steps; after each, the mean inter-head cosine of B (METHODS
# §4.1, tests/test_analysis.py::test_head_cosine_similarity_matches_pairwise_loop). HydraLoRA without router
# (METHODS §2.4): zero heads with one gradient stay identical, a rank-r LoRA in disguise (tests/test_adapters.py::
# test_hydra_without_router_keeps_identical_heads). The others have a router, random inits and dropout masks, or
# per-task mixing to tell heads apart (MultiLoRA's B_i live in different bases: their cosine says little).
# The first cosine is at step 0 (zero heads: n/a). After Adam's first step HydraLoRA's heads are *nearly* parallel:
# Adam normalises each entry's update and the router only reweights head i's gradients by ω_i(x) > 0, so the heads
# take almost the same signed step. R-LoRA's and M-LoRA's random heads (cosine ≈ 0) get near-identical gradients,
# so their cosine can only rise with training (tutorial 03).

# %%
fixed = [next(batches) for _ in range(STEPS)]           # the same batches for every adapter
probe = fixed[0]


def probe_logits(m):
    with torch.no_grad(), adapter_context(m, task_ids=probe["task_ids"]):
        return m(probe["input_ids"], probe["attention_mask"])


base_logits, real = probe_logits(model), {}
for kind in KINDS:
    t0 = time.perf_counter()
    m = adapt(copy.deepcopy(model), kind).eval()
    start_diff = (probe_logits(m) - base_logits).abs().max().item()
    opt = torch.optim.AdamW([t for t in m.parameters() if t.requires_grad], lr=LR, weight_decay=0.0)
    cos, losses = [head_cos(m)[0]], []
    m.train()
    for b in fixed:
        loss = lm_loss(m, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        cos.append(head_cos(m)[0])
    m.eval()
    cos_min = head_cos(m)[1]
    head_spread = None if kind != "hydra-norouter" else max(  # identical, not merely parallel: max |B_i − B_0|
        (a.lora_B.weight - a.lora_B.weight[:1]).abs().max().item() for _, a in adapter_modules(m))
    trained = probe_logits(m)
    try:
        merge_adapters(m)
        merge_diff = (probe_logits(m) - trained).abs().max().item()
        merge = "yes"
    except ValueError as e:
        merge_diff, merge = None, f"no: {str(e).split(': ', 1)[1]}"
    real[kind] = {"init_max_abs_logit_diff": start_diff, "loss": losses, "head_cos_mean_per_step": cos,
                  "head_cos_min_final": cos_min, "max_abs_head_difference": head_spread, "mergeable": merge == "yes",
                  "merge_max_abs_logit_diff": merge_diff, "merge_message": merge,
                  "seconds": round(time.perf_counter() - t0, 1)}
    merged_txt = "no" if merge_diff is None else f"yes, |Δlogit| {merge_diff:.1e}"
    print(f"    {kind:15s} start |Δlogit| {start_diff:8.2e} | loss {losses[0]:.3f} -> {losses[-1]:.3f} | head cos "
          + " ".join("  n/a" if v is None else f"{v:5.3f}" for v in cos) + f" | merge: {merged_txt} "
          f"({real[kind]['seconds']} s)")
    del m, opt
results["real_model"] = {"steps": STEPS, "lr": LR, "optimizer": "AdamW", "batch": "1 example per task",
                         "adapters": real}
nr = real["hydra-norouter"]
print(f"\n    hydra-norouter after {STEPS} steps: head cosine {nr['head_cos_mean_per_step'][-1]:.6f} (min over modules "
      f"{nr['head_cos_min_final']:.6f}), max |B_i − B_0| = {nr['max_abs_head_difference']:.1e}: one LoRA, copied")

# %% Results and plot
results["wall_s"] = round(time.perf_counter() - t_start, 1)
print(f"\nwrote {write_json(args.out / '02_multi_head_family.json', results)} ({results['wall_s']} s)")
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    w = 0.38
    for j, n in enumerate(names):
        vals = [counts[n][k]["percent"] for k in KINDS]
        bars = ax[0].bar([i + (j - 0.5) * w for i in range(len(KINDS))], vals, w, label=n)
        ax[0].bar_label(bars, [f"{counts[n][k]['trainable'] / 1e6:.1f}M" for k in KINDS], fontsize=7, rotation=90,
                        padding=2)
    ax[0].set_xticks(range(len(KINDS)), KINDS, rotation=30, ha="right")
    ax[0].set(ylabel="trainable, % of base", title=f"parameters (r={RANK}, {HEADS} heads, MLP targets)")
    ax[0].margins(y=0.25)
    ax[0].legend()
    for kind, style in zip(KINDS[1:], ["o-", "s-", "^-", "v--", "D-", "x-"]):
        c = real[kind]["head_cos_mean_per_step"]
        ax[1].plot(range(len(c)), [math.nan if v is None else v for v in c], style, label=kind)
    ax[1].set(xlabel="optimizer step", ylabel="mean inter-head cosine of B", ylim=(-0.1, 1.05),
              title=f"head similarity on {'the tiny model' if args.tiny else model_name}")
    ax[1].legend(fontsize=8)
    print(f"wrote {save_figure(fig, args.out / '02_multi_head_family.png')}")
