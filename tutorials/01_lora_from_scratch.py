"""Tutorial 01 — LoRA from scratch: the equation, its init, its scaling and its merge (METHODS.md §2.1).

    h = W0 x + b + s · B A drop(x),   A ∈ R^{r×d_in} kaiming-uniform,   B ∈ R^{d_out×r} = 0,   s = α/r

First on one nn.Linear of SmolLM2's up_proj shape, by hand against nanoalign's LoRALinear (a few Adam steps show
what s does to the update); then on SmolLM2-135M with `apply_adapter`, `export_peft` and `merge_adapters`.

    python tutorials/01_lora_from_scratch.py           # smollm2-135m on CPU
    python tutorials/01_lora_from_scratch.py --tiny    # tiny random model, seconds (the smoke test)
    python tutorials/01_lora_from_scratch.py --full    # Qwen2.5-7B: the Align-LoRA code's setting; a GPU box
"""

# %% [setup]
import math
import tempfile
import time
from pathlib import Path

from common import MLP, load_base, machine, parser, pyplot, save_figure, write_json

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from nanoalign.adapters import LoRALinear, adapter_modules, apply_adapter, count_trainable, merge_adapters
from nanoalign.plumbing.adapter_io import export_peft
from nanoalign.plumbing.datasets import load_tasks

args = parser(__doc__, full_model="qwen2.5-7b").parse_args()
RANK, ALPHA = 8, 32.0                  # the Align-LoRA code default (METHODS §2.1)
SWEEP_RANKS = [1, 2, 4, 8] if args.tiny else [1, 2, 4, 8, 16, 32, 64]
SWEEP_STEPS = 5 if args.tiny else 20
t_start = time.perf_counter()
torch.manual_seed(args.seed)
model, tok, model_name = load_base(args)
cfg = model.config
results = {"meta": machine(), "model": model_name, "rank": RANK, "alpha": ALPHA}

# %% [markdown]
# ## 1. The equation, on one layer
# A frozen layer h = W0 x + b gets a trainable detour through a rank-r bottleneck: A squeezes x to r numbers, B
# expands them back, s scales the result. By hand, against `LoRALinear`
# (tests/test_adapters.py::test_forward_matches_reference_equation).

# %%
d_in, d_out = cfg.hidden_size, cfg.intermediate_size  # up_proj: hidden -> intermediate
torch.manual_seed(args.seed)
base = nn.Linear(d_in, d_out).requires_grad_(False)

A = torch.empty(RANK, d_in)
nn.init.kaiming_uniform_(A, a=math.sqrt(5))          # PEFT's / nn.Linear's default: U(−1/√d_in, +1/√d_in)
B = torch.randn(d_out, RANK) * 0.02                  # random here, so the check below sees the B·A term at all
s = ALPHA / RANK
x = torch.randn(16, d_in)
by_hand = x @ base.weight.T + base.bias + s * (x @ A.T) @ B.T

layer = LoRALinear(base, rank=RANK, alpha=ALPHA).eval()
with torch.no_grad():
    layer.lora_A.weight.copy_(A)
    layer.lora_B.weight.copy_(B)
    ours = layer(x)
eq_diff = results["equation_max_abs_diff"] = (ours - by_hand).abs().max().item()
print(f"\n[1] by hand vs LoRALinear: max |diff| = {eq_diff:.2e} (fp32 round-off; "
      f"|ΔW x| is about {(s * (x @ A.T) @ B.T).abs().max():.2f})")

# %% [markdown]
# ## 2. The init: B = 0, so the adapted layer starts *bit-for-bit* as the base layer
# A is non-zero so that B gets a gradient at step 1 (∂L/∂B = s·g·(A x)ᵀ); A gets none until B has moved
# (∂L/∂A = s·Bᵀ g xᵀ = 0). (tests/test_adapters.py::test_zero_init_leaves_layer_unchanged)

# %%
torch.manual_seed(args.seed)
fresh = LoRALinear(base, rank=RANK, alpha=ALPHA).eval()
with torch.no_grad():
    init_diff = (fresh(x) - base(x)).abs().max().item()
bound = 1 / math.sqrt(d_in)
a = fresh.lora_A.weight
print(f"[2] fresh adapter: max |h − W0 x − b| = {init_diff} (exactly zero); |A| ≤ {a.abs().max():.4f} "
      f"(bound 1/√d_in = {bound:.4f}), std(A) = {a.std():.4f} (uniform: 1/√(3·d_in) = {bound / math.sqrt(3):.4f}), "
      f"B all zero: {bool((fresh.lora_B.weight == 0).all())}")
results["init"] = {"max_abs_diff_vs_base": init_diff, "A_max_abs": a.abs().max().item(), "A_bound": bound,
                   "A_std": a.std().item(), "B_is_zero": bool((fresh.lora_B.weight == 0).all())}

# %% [markdown]
# ## 3. The scaling s = α/r: what one Adam step does at different ranks
# Fit a random rank-4 ΔW* with a rank-r LoRA under α/r (LoRA, HydraLoRA, Align-LoRA) and α/√r (the R-LoRA script's,
# METHODS §2.5). Adam's first step moves every entry of B by ±lr, so the first ΔW = s·B·A adds r rows of A with
# unaligned signs: ‖ΔW‖_F ∝ s·√r, i.e. ∝ 1/√r under α/r (a higher rank learns *slower* at first), flat under α/√r.

# %%
def sweep(rank, rank_stabilized, steps, lr=1e-3):
    torch.manual_seed(args.seed)
    m = LoRALinear(base, rank=rank, alpha=ALPHA, rank_stabilized=rank_stabilized)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    dw, losses = [], []
    for _ in range(steps):
        loss = F.mse_loss(m(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        dw.append(m.delta_weight().norm().item())
    with torch.no_grad():
        final = F.mse_loss(m(X), Y).item()
    return {"rank": rank, "s": m.scaling, "dW_fro_step1": dw[0], "dW_fro_final": dw[-1], "loss_init": losses[0],
            "loss_final": final}, m


g = torch.Generator().manual_seed(args.seed + 1)
target = (torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g)) / math.sqrt(d_in)
X = torch.randn(256, d_in, generator=g)
with torch.no_grad():
    Y = base(X) + X @ target.T
scaling = {name: [sweep(r, rs, SWEEP_STEPS)[0] for r in SWEEP_RANKS]
           for name, rs in (("alpha/r", False), ("alpha/sqrt(r)", True))}
kept = sweep(RANK, False, SWEEP_STEPS)[1]  # the trained rank-8 layer (seeded: the same as in the sweep), merged in 4
print(f"[3] ‖ΔW‖_F after Adam step 1 (lr 1e-3) and loss after {SWEEP_STEPS} steps (init loss "
      f"{scaling['alpha/r'][0]['loss_init']:.3f}):")
print("      r |   α/r: s  ‖ΔW‖ step1   loss |  α/√r: s  ‖ΔW‖ step1   loss")
for a_row, b_row in zip(scaling["alpha/r"], scaling["alpha/sqrt(r)"]):
    print(f"    {a_row['rank']:3d} | {a_row['s']:8.3f} {a_row['dW_fro_step1']:11.4f} {a_row['loss_final']:6.3f} | "
          f"{b_row['s']:8.3f} {b_row['dW_fro_step1']:11.4f} {b_row['loss_final']:6.3f}")
lo, hi = SWEEP_RANKS[0], SWEEP_RANKS[-1]
growth = {k: v[-1]["dW_fro_step1"] / v[0]["dW_fro_step1"] for k, v in scaling.items()}
print(f"    first-step ‖ΔW‖ from r={lo} to r={hi}: ×{growth['alpha/r']:.2f} under α/r, "
      f"×{growth['alpha/sqrt(r)']:.2f} under α/√r (√(r ratio) = {math.sqrt(hi / lo):.1f})")
results["scaling_sweep"] = {"steps": SWEEP_STEPS, "lr": 1e-3, "rows": scaling,
                            "first_step_dW_growth_lowest_to_highest_rank": growth}

# %% [markdown]
# ## 4. Merging: at inference h = (W0 + s·B·A) x + b, so `merge()` returns a plain nn.Linear, equal to fp32
# round-off (tests/test_adapters.py::test_merge_equals_unmerged)

# %%
kept.eval()
with torch.no_grad():
    merged = kept.merge()
    merge_diff = (merged(X) - kept(X)).abs().max().item()
    delta = (kept(X) - base(X)).abs().max().item()
n_layer = count_trainable(kept)
print(f"[4] merged vs unmerged (trained rank-{RANK} layer): max |diff| = {merge_diff:.2e}, while |ΔW x| reaches "
      f"{delta:.3f}; merged type: {type(merged).__name__}")
print(f"    trainable parameters of the layer: {n_layer:,} = r·(d_in + d_out) = {RANK}·({d_in}+{d_out}), vs "
      f"{d_in * d_out:,} in W0 ({100 * n_layer / (d_in * d_out):.2f}%)")
results["one_layer"] = {"d_in": d_in, "d_out": d_out, "trainable": n_layer, "formula": RANK * (d_in + d_out),
                        "merge_max_abs_diff": merge_diff, "delta_max_abs": delta}

# %% [markdown]
# ## 5. The same on the real model
# `apply_adapter` swaps every gate/up/down_proj for a LoRALinear that *shares* the frozen weight and freezes the
# rest; with B = 0 the logits are exactly the base logits. Tests: tests/test_adapters.py::
# test_apply_adapter_targets_and_freezing, ::test_parameter_counts_match_methods_table (METHODS §1).

# %%
example = load_tasks("builtin", "test", max_per_task=1)["colour-review"][0]
ids = torch.tensor([tok.encode(example["prompt"])])
with torch.no_grad():
    base_logits = model(ids)
n_base = sum(p.numel() for p in model.parameters())
torch.manual_seed(args.seed)
apply_adapter(model, "lora", rank=RANK, alpha=ALPHA, targets=MLP, dropout=0.1)
with torch.no_grad():
    model_init_diff = (model(ids) - base_logits).abs().max().item()
n_train = count_trainable(model)
per_layer = sum(m.rank * (m.in_features + m.out_features) for _, m in adapter_modules(model))
frozen_grad = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
print(f"\n[5] {model_name}: {cfg.num_hidden_layers} layers, {len(adapter_modules(model))} adapted modules "
      f"({', '.join(MLP)})")
print(f"    logits with fresh adapters vs base: max |diff| = {model_init_diff} (prompt of {ids.shape[1]} tokens)")
print(f"    trainable: {n_train:,} = Σ r·(d_in+d_out) = {per_layer:,}; {100 * n_train / n_base:.3f}% of "
      f"{n_base:,}; trainable non-LoRA tensors: {len(frozen_grad)}")
results["model_lora"] = {"base_params": n_base, "adapted_modules": len(adapter_modules(model)),
                         "trainable": n_train, "formula": per_layer, "percent": 100 * n_train / n_base,
                         "init_max_abs_logit_diff": model_init_diff, "trainable_non_lora": len(frozen_grad)}

# %% [markdown]
# ## 6. Export to PEFT (keys renamed, same shapes: tests/test_adapter_io.py), then give every B random values, a
# stand-in for training, and fold all adapters in with `merge_adapters` (tests/test_adapters.py::
# test_merge_adapters_model)

# %%
with tempfile.TemporaryDirectory() as d:
    export_peft(model, d, base_model_name_or_path=model_name)
    with safe_open(str(Path(d) / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        shapes = {k: list(f.get_slice(k).get_shape()) for k in keys[:2]}
print(f"[6] PEFT export: {len(keys)} tensors, e.g. {keys[0]} {shapes[keys[0]]}")

g = torch.Generator().manual_seed(args.seed + 2)
with torch.no_grad():
    for _, m in adapter_modules(model):
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    unmerged = model(ids)
    merge_adapters(model)
    merged_logits = model(ids)
model_merge_diff = (merged_logits - unmerged).abs().max().item()
moved = (unmerged - base_logits).abs().max().item()
same_token = bool((merged_logits[0, -1].argmax() == unmerged[0, -1].argmax()).item())
left = len(adapter_modules(model))
print(f"    random B (std 0.02) moves the logits by up to {moved:.2f}; merged vs unmerged: max |diff| = "
      f"{model_merge_diff:.2e}; same greedy next token: {same_token}; adapters left: {left}; parameters now "
      f"{sum(p.numel() for p in model.parameters()):,} (= base)")
results["model_merge"] = {"peft_tensors": len(keys), "peft_key_example": keys[0], "random_B_logit_shift": moved,
                          "merge_max_abs_logit_diff": model_merge_diff, "same_greedy_token": same_token,
                          "adapters_left": left, "params_after_merge": sum(p.numel() for p in model.parameters())}

# %% Results and plot
results["wall_s"] = round(time.perf_counter() - t_start, 1)
print(f"\nwrote {write_json(args.out / '01_lora_from_scratch.json', results)} ({results['wall_s']} s)")
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in scaling.items():
        for a_, key in zip(ax, ("dW_fro_step1", "loss_final")):
            a_.plot(SWEEP_RANKS, [row[key] for row in rows], "o-", label=f"s = {name.replace('alpha', 'α')}")
    ax[0].set(xscale="log", yscale="log", xlabel="rank r", ylabel="‖ΔW‖_F after one Adam step",
              title=f"first update size (α={ALPHA:g}, lr 1e-3)")
    ax[1].set(xscale="log", yscale="log", xlabel="rank r", ylabel="MSE",
              title=f"loss after {SWEEP_STEPS} steps (target: rank-4 ΔW*)")
    for a_ in ax:
        a_.set_xticks(SWEEP_RANKS, [str(r) for r in SWEEP_RANKS])
        a_.legend()
    fig.suptitle(f"01 LoRA scaling on one {d_in}→{d_out} layer", fontsize=10)
    print(f"wrote {save_figure(fig, args.out / '01_lora_from_scratch.png')}")
