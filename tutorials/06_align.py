"""Tutorial 06 — claims 4-6: "align, don't divide" (METHODS.md §7 claims 4-6, §2.10, §3).

Align-LoRA keeps ONE plain LoRA and adds a loss that pulls the per-task distributions of its A-outputs together:

    L = L_LM + λ · L_align,   L_align = mean over modules m, mean over task pairs p<q of D(Z_m[p], Z_m[q])

with Z_m = A_m·drop(x) over each task's real tokens in the micro-batch, and D the symmetric KL between diagonal
Gaussians (A-LoRA-K) or a multi-kernel MMD² (A-LoRA-M), nanoalign/align.py. The paper's anchors (METHODS §6.2):

    claim 4   8-task in-domain, Qwen2.5-3B (Table 5)   LoRA 76.48   A-LoRA-K 80.06   A-LoRA-M 78.35
    claim 5   BBH, Qwen2.5-7B (Table 4)               LoRA(r=10) 48.36   A-LoRA-K(r=8) 50.28   A-LoRA-M(r=8) 47.53
    claim 6   λ sweep 0.01-0.50 (Figure 3)            A-LoRA-K 75.10-75.75 at every λ, LoRA 74.00

The paper's λ multiplies a SUM over task pairs (Eq. 5), nanoalign's L_align is the released code's MEAN, so the
paper's λ is ours / (T(T−1)/2) (experiments/claims.py `lam`); λ below is in the paper's units. This reads grids
"4-5" (LoRA, A-LoRA-K, A-LoRA-M at rank 8, λ = 0.1) and "6" (A-LoRA-K at λ = 0.01-0.5) of experiments/claims.py and
each "4-5" run's held-out separation probe (experiments.analysis.separation_probe).
"""

# %% [setup]
import itertools

from common import claim_grids, finish, parse_args, pinned, reference_lines, toy

from experiments import claims as C
from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, bar, comparison_table, interval, markdown, pm, \
    print_paired, probe_table, seed_pairs, sep_ratio, show, suite_text, task_table, value_bars
from nanoalign.adapters import adapter_context
from nanoalign.align import alignment_loss, kl_alignment_loss, task_groups

args = parse_args(__doc__, ["4-5", "6"])
LABELS = ["lora-r8", "a-lora-k", "a-lora-m"]
SWEEP = list(paper.SWEEP)  # claim 6's A-LoRA-K labels, by the paper's λ

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds
# L_align by hand: one module's A-outputs grouped by task, each task a diagonal Gaussian (unbiased variance + 1e-8),
# the symmetric KL summed over the r dims and averaged over task pairs (METHODS §3.3, §3.5). Its backward alone
# reaches the module's A and never its B, which acts after Z.

# %%
def toy_mechanism():
    """The symmetric KL of one toy module by hand vs nanoalign.align, and where its gradient goes."""
    model, batches, _ = toy("lora")
    b, name = next(batches), "model.layers.0.mlp.up_proj"
    with adapter_context(model, collect=True) as ctx:
        model(b["input_ids"], b["attention_mask"])
    z, mask, tasks = ctx.a_outputs[name], b["attention_mask"], b["task_ids"]    # z: [B, T, r]
    gauss = []
    for t in tasks.unique():
        rows = z[mask & (tasks == t)[:, None]]                                  # task t's tokens, [N_t, r]
        gauss.append((rows.mean(0), rows.var(0) + 1e-8))                        # (μ_t, σ²_t + eps)
    kl = lambda p, q: 0.5 * (q[1].log() - p[1].log() + p[1] / q[1] + (q[0] - p[0]) ** 2 / q[1] - 1).sum()  # noqa
    pairs = list(itertools.combinations(gauss, 2))
    hand = sum(0.5 * (kl(p, q) + kl(q, p)) for p, q in pairs) / len(pairs)
    lib = alignment_loss({name: z}, mask, tasks, kind="kl")                     # what train.py adds, λ-weighted
    groups = kl_alignment_loss(task_groups(z, mask, tasks))
    lib.backward()                                                              # L_align alone, no LM loss
    m = model.get_submodule(name)
    grad_a = m.lora_A.weight.grad.norm().item()
    grad_b = 0.0 if m.lora_B.weight.grad is None else m.lora_B.weight.grad.abs().max().item()
    out = {"module": name, "tasks": len(gauss), "pairs": len(pairs), "kl_by_hand": hand.item(),
           "alignment_loss": lib.item(), "kl_alignment_loss": groups.item(),
           "max_abs_diff": max(abs(hand.item() - lib.item()), abs(hand.item() - groups.item())),
           "grad_A_norm": grad_a, "grad_B_max_abs": grad_b}
    print(f"mechanism (tiny random Llama, LoRA r=4, {name}, {len(gauss)} tasks = {len(pairs)} pairs):")
    print(f"  symmetric KL by hand {hand.item():.6f}; alignment_loss {lib.item():.6f}; kl_alignment_loss"
          f"(task_groups) {groups.item():.6f}; largest difference {out['max_abs_diff']:.1e}")
    print(f"  backward of L_align alone: |grad lora_A| = {grad_a:.3e}, max |grad lora_B| = {grad_b:g}")
    return pinned(out, "tests/test_align.py::test_kl_matches_torch_distributions",
                  "tests/test_align.py::test_alignment_gradient_reaches_every_A_and_never_the_own_B")


mechanism_toy = toy_mechanism()

# %% [markdown]
# ## 1. Claims 4 and 5: one plain LoRA trained without alignment, with KL and with MMD (same seeds and test set)
# Claim 4: A-LoRA-K − LoRA above 0; claim 5: A-LoRA-K − A-LoRA-M above 0.

# %%
grids = claim_grids(args.tiny, args.rerun)
c = grids.read_or_stop("4-5")
T = len(c.tasks())
print(f"λ = 0.1 in the paper's units is {C.lam(0.1, T):g} in ours ({T} tasks, {T * (T - 1) // 2} pairs)")
show("suite average accuracy, mean ± SE over seeds", accuracy_table(c, LABELS))
show("per task (%); the paper's Table 5 gives averages only",
     task_table(c, LABELS, {k: {"Avg": paper.TABLE5_3B[k]} for k in LABELS}))
show("claimed differences (points)", comparison_table(c))

# %% [markdown]
# ## 2. What the loss does to the representation: the separation probe
# Held-out examples' A-outputs (mean over tokens): between-task over within-task distance, mean over modules, one
# number per run, paired seed by seed (t interval, 95%); claimed: alignment lowers it.

# %%
probe = probe_table(c, LABELS)
mechanism = seed_pairs(c, [("a-lora-k", "lora-r8"), ("a-lora-m", "lora-r8")], sep_ratio, False)
print_paired(mechanism, "separation", "lower")

# %% 3. Claim 6: A-LoRA-K above LoRA at every λ in [0.01, 0.5], best near 0.1
c6 = grids.read("6", script="06_align.py")
sweep = []
if c6 is not None:
    for k in SWEEP:
        r, x = c6.row(k), c6.comparison(k, "lora-r8")
        sweep.append({"label": k, "paper_lambda": paper.SWEEP[k], "our_lambda": C.lam(paper.SWEEP[k], T),
                      "average": r["average"] if r else None, "se": r["se"] if r else None,
                      "seeds": len(r["seeds"]) if r else 0, "vs_lora": x})
    show("λ sweep (claim 6)", accuracy_table(c6))
    show("A-LoRA-K − LoRA at each λ", markdown(
        ["λ (paper's units)", "λ (ours)", "A-LoRA-K (%) ± SE", "− LoRA [95% CI]", "seeds", "verdict"],
        [[f"{s['paper_lambda']:g}", f"{s['our_lambda']:g}", pm(s["average"], s["se"]) if s["average"] is not None
          else "not run yet", interval(s["vs_lora"]) if s["vs_lora"] else "–", str(s["seeds"]),
          s["vs_lora"]["verdict"] if s["vs_lora"] else "–"] for s in sweep]))

# %% Plot: claims 4-5; the separation probe; the λ sweep and its difference with LoRA beside the paper's gap
def draw(plt):
    fig, ax = plt.subplots(2, 3, figsize=(16, 8))
    accuracy_panels(ax[0, 0], ax[0, 1], c, LABELS, title="claims 4-5: paired differences, 95% CI")
    value_bars(ax[0, 2], {k: p["sep_ratio"] for k, p in probe.items()}, "held-out task separation of A-outputs (± SE)",
               "between / within")
    pts = [s for s in sweep if s["average"] is not None]
    if pts:
        ax[1, 0].errorbar([s["paper_lambda"] for s in pts], [s["average"] for s in pts],
                          yerr=[bar(s["se"]) for s in pts], fmt="o-", capsize=4, label="A-LoRA-K (± SE)")
        reference_lines(ax[1, 0], c6, "lora-r8", "LoRA r=8")
        ax[1, 0].set(xscale="log", xlabel="λ (paper's units: sum over task pairs)", ylabel="suite average (%)",
                     title="claim 6: λ sweep")
        ax[1, 0].legend(fontsize=7)
    dif = [s for s in sweep if s["vs_lora"]]
    if dif:
        lo, hi = paper.FIGURE3["a-lora-k"]
        ax[1, 1].axhspan(lo - paper.FIGURE3["lora"], hi - paper.FIGURE3["lora"], color="mistyrose",
                         label="paper (Figure 3)")
        ax[1, 1].errorbar([s["paper_lambda"] for s in dif], [s["vs_lora"]["diff"] for s in dif],
                          yerr=[[s["vs_lora"]["diff"] - s["vs_lora"]["low"] for s in dif],
                                [s["vs_lora"]["high"] - s["vs_lora"]["diff"] for s in dif]], fmt="o", capsize=4,
                          color="k", label="ours, 95% CI")
        ax[1, 1].axhline(0, color="gray", lw=1)
        ax[1, 1].set(xscale="log", xlabel="λ (paper's units)", ylabel="A-LoRA-K − LoRA (points)",
                     title="claim 6: difference with LoRA")
        ax[1, 1].legend(fontsize=7)
    value_bars(ax[1, 2], {k: p["heldout_kl"] for k, p in probe.items()}, "held-out alignment loss (KL, ± SE)",
               "symmetric KL, mean over pairs and modules", "mistyrose")
    return fig


claims = {"4-5": c.to_json(), **({"6": c6.to_json()} if c6 else {})}
finish(args, "06_align", {"mechanism": mechanism_toy, "claims": claims, "probe": probe, "separation": mechanism,
                          "sweep": sweep,
                          "paper": {"Table 5 (3B)": paper.TABLE5_3B, "Figure 3": paper.FIGURE3}},
       draw, f"06 align, don't divide: {suite_text(c)}")
