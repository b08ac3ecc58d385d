"""Tutorial 03 — claim 1, second half: "the heads of multi-head LoRA end up alike" (METHODS.md §7 claim 1, §4.1).

Align-LoRA's Figure 2 (Qwen2.5-3B, rank 4, 3 heads, gate/up/down): the inter-head cosine similarity of the B
matrices per layer and module type is high for HydraLoRA, R-LoRA and M-LoRA, highest for M-LoRA (median above
~0.85). Alike heads leave the router nothing to choose: Σ_i ω_i(x) B_i ≈ (Σ_i ω_i(x) c_i) B, one LoRA.

This reads the head analysis of grid "1-2" (experiments/claims.py, the runs tutorial 04 scores): per run and
(layer, module type), the mean pairwise cosine of the flattened B_i (experiments.analysis.head_cosine_similarity).
"""

# %% [setup]
import math

import torch
from common import MLP, claim_grids, finish, head_cos, lm_loss, parse_args, pinned, toy

from experiments import paper
from experiments.reports import head_cosine, interval, markdown, name, pm, seed_pairs, show, suite_text
from experiments.stats import mean_se

args = parse_args(__doc__, ["1-2"])
LABELS = ["hydra", "hydra-norouter", "rlora", "mlora"]

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds
# The mean inter-head cosine of B over 5 AdamW steps for zero-init heads with and without a router and random-init
# heads (R-LoRA) at the grids' lr 1e-3, and R-LoRA at 1e-2: its random start is forgotten once the steps outgrow it.

# %%
def toy_mechanism(steps=5):
    """Mean inter-head cosine of B (None while zero) at AdamW steps 0..`steps` on the toy."""
    curves = {}
    for kind, lr in (("hydra", 1e-3), ("hydra-norouter", 1e-3), ("rlora", 1e-3), ("rlora", 1e-2)):
        model, batches, _ = toy(kind, dropout=0.1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        curve = curves[f"{kind} lr={lr:g}"] = [head_cos(model)[0]]
        for _ in range(steps):
            lm_loss(model, next(batches)).backward()
            opt.step()
            opt.zero_grad()
            curve.append(head_cos(model)[0])
    print(f"mechanism (tiny random Llama, rank 4, 3 heads): mean inter-head cosine of B at steps 0..{steps}")
    for key, curve in curves.items():
        kind, lr = key.split()
        print(f"  {name(kind) + ', ' + lr:30s} " + "  ".join("zero heads" if v is None else f"{v:.4f}" for v in curve))
    return pinned({"steps": steps, "head_cosine_per_step": curves},
                  "tests/test_adapters.py::test_hydra_without_router_keeps_identical_heads",
                  "tests/test_adapters.py::test_random_init_heads_differ_and_compensation",
                  "tests/test_analysis.py::test_zero_init_heads_become_alike_random_init_heads_stay_apart")


mechanism_toy = toy_mechanism()

# %% [markdown]
# ## 1. How alike the heads are, per method and module type, beside the paper's reference
# The grid's head analyses: 1 means every head is the same matrix, ≈0 unrelated (random) heads.

# %%
c = claim_grids(args.tiny, args.rerun).read_or_stop("1-2")


def per_layer(run, module):
    """[cosine of layer 0, 1, ...] of one run for one module type."""
    d = run["analysis"]["head_cosine_per_layer"]
    return [v for k, v in sorted(d.items(), key=lambda kv: int(kv[0].split(".")[0])) if k.endswith(module)]


def mean_se_finite(xs):
    """mean_se over the values that are numbers (NaN when there are none)."""
    return mean_se([x for x in xs if x is not None and not math.isnan(x)] or [math.nan])


def layer_stats(label, module):
    """[(mean, SE) over seeds] per layer of one method and module type."""
    return [mean_se_finite(v) for v in zip(*[per_layer(r, module) for r in c.runs[label]])]


REF = {"hydra": "gate {gate_proj:.2f}, up {up_proj:.2f}, down {down_proj:.2f} (R-LoRA repo)".format(
           **paper.HEAD_COSINE["hydra"]),
       "mlora": f"highest; median > {paper.HEAD_COSINE['mlora_median_above']:.2f} (Fig. 2)",
       "rlora": "high, below M-LoRA (Fig. 2)", "hydra-norouter": "1 exactly (derived, tutorial 02)"}
rows, summary = [], {}
for k in LABELS:
    runs = c.runs.get(k) or []
    if not runs:
        rows.append([name(k), "0", "not run yet", "", "", "", ""])
        continue
    s = summary[k] = {"all": mean_se_finite([r["analysis"]["head_cosine_mean"] for r in runs]),
                      **{m: mean_se_finite([r["analysis"]["head_cosine"][m] for r in runs]) for m in MLP}}
    rows.append([name(k), str(len(runs)), pm(*s["all"], 3), *[pm(*s[m], 3) for m in MLP], REF[k]])
show("mean inter-head cosine of B (mean over layers; ± SE over seeds)",
     markdown(["method", "seeds", "all modules", *MLP, "paper"], rows))

# %% [markdown]
# ## 2. The claimed ordering (M-LoRA's heads the most alike), paired seed by seed (t interval, 95%)
# It can come out the other way at a small budget: random heads that move too little to forget their start
# (section 0). The "code init" control rows start them near zero instead.

# %%
ordering = seed_pairs(c, [("mlora", "rlora"), ("mlora", "hydra")], head_cosine, True)
show("head cosine differences (paired over seeds, t interval 95%)", markdown(
    ["difference", "mean [95% CI]", "seeds", "verdict"],
    [[f"{name(x['a'])} − {name(x['b'])}", interval(x, 3), str(x["seeds"]), x["verdict"]] for x in ordering])
     if ordering else "(not measured yet)")

# %% 3. Claim 2's mechanism, exactly: HydraLoRA w/o Router's heads get one gradient and stay bit-identical
norouter = [v for r in c.runs.get("hydra-norouter") or [] for v in r["analysis"]["head_cosine_per_layer"].values()]
exact = {"max_abs_one_minus_cos": max(abs(1 - v) for v in norouter) if norouter else None, "values": len(norouter)}
if norouter:
    print(f"\nHydraLoRA w/o Router: max |1 − cos| over {len(norouter)} (layer, module, seed) values = "
          f"{exact['max_abs_one_minus_cos']:.1e}")

# %% Plot: per layer (mean over seeds, band ± SE) and, as the paper's Figure 2, box plots over layers
def draw(plt):
    from matplotlib.ticker import MaxNLocator
    shown = [k for k in LABELS if c.runs.get(k)]
    if not shown:
        return None
    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5))
    for j, m in enumerate(MLP):
        for k in shown:
            stats = layer_stats(k, m)
            layers = range(len(stats))
            ax[0, j].plot(layers, [s[0] for s in stats], "o-", ms=3, label=name(k))
            ax[0, j].fill_between(layers, [s[0] - s[1] for s in stats], [s[0] + s[1] for s in stats], alpha=0.2)
        ax[0, j].axhline(paper.HEAD_COSINE["hydra"][m], color="tab:blue", ls=":", lw=1,
                         label="HydraLoRA, R-LoRA repo figure")
        ax[0, j].set(title=m, xlabel="layer", ylim=(-0.1, 1.05))
        ax[0, j].xaxis.set_major_locator(MaxNLocator(integer=True))
        # Figure 2: one box per method over the layers, each layer's value the mean over seeds
        ax[1, j].boxplot([[s[0] for s in layer_stats(k, m) if not math.isnan(s[0])] for k in shown])
        ax[1, j].set_xticks(range(1, len(shown) + 1), [name(k) for k in shown], rotation=15, fontsize=7)
        ax[1, j].axhline(paper.HEAD_COSINE["mlora_median_above"], color="tab:red", ls=":", lw=1,
                         label="paper: M-LoRA median above")
        ax[1, j].set(title=f"{m}: over layers", ylim=(-0.1, 1.05))
    for a in ax[:, 0]:
        a.set_ylabel("mean inter-head cosine of B")
        a.legend(fontsize=7)
    return fig


finish(args, "03_head_similarity", {
    "mechanism": mechanism_toy, "claims": {"1-2": c.to_json()}, "head_cosine": summary, "ordering": ordering,
    "norouter_identical_heads": exact,
    "per_layer": {k: {m: [per_layer(r, m) for r in c.runs[k]] for m in MLP} for k in LABELS if c.runs.get(k)},
    "paper": paper.HEAD_COSINE}, draw, f"03 head similarity: {suite_text(c)}")
