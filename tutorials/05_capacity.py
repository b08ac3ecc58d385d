"""Tutorial 05 — claim 3: "capacity, not architecture" (METHODS.md §7 claim 3, §2.2, §6.2).

A multi-head LoRA with a shared A (HydraLoRA, R-LoRA) spends its extra parameters on N up-projections B_i and a
router. Align-LoRA argues that their gains over a plain LoRA come from that extra capacity: a single LoRA whose rank
is raised to the same parameter budget ("LoRA†", "LoRA¹⁰") does as well. The paper's anchors (METHODS §6.2):

    Qwen2.5-7B, Flan-v2 -> BBH (Table 3)   LoRA¹⁰ 49.51   HydraLoRA 49.12   R-LoRA 49.51   (LoRA⁸ 46.66)
    LLaMA2-7B,  Flan-v2 -> BBH (Table 2)   LoRA† 42.21    HydraLoRA 41.46   R-LoRA 42.24

So the claim is an equivalence. This reads grid "3" of experiments/claims.py: HydraLoRA and R-LoRA (rank 4, 3
heads, gate/up/down), a LoRA at HydraLoRA's parameter count (`rank_for_budget`), and each run's ΔW effective rank
(experiments.analysis.delta_weight_spectrum).
"""

# %% [setup]
import torch
import torch.nn as nn
from common import MLP, QWEN25_3B, claim_grids, finish, parse_args, pinned, toy

from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, comparison_table, markdown, name, pm, show, \
    suite_text, task_table, value_bars
from experiments.stats import mean_se
from nanoalign.adapters import apply_adapter, count_trainable, rank_for_budget
from nanoalign.model import CausalLM, ModelConfig

args = parse_args(__doc__, ["3"])
LABELS = ["lora-budget", "hydra", "rlora"]

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds: the budget arithmetic
# HydraLoRA trains A (r·d_in), N heads B_i (N·d_out·r) and a router (N·d_in) per module; a rank-k LoRA trains
# k·(d_in + d_out), so the matched k is round(budget / Σ(d_in + d_out)). By hand on the toy and on Qwen2.5-3B (meta
# device), against count_trainable and rank_for_budget.

# %%
def toy_mechanism(r=4, heads=3):
    """HydraLoRA's budget and the matched LoRA rank by hand vs count_trainable / rank_for_budget."""
    out = {}
    print(f"mechanism: HydraLoRA r={r} x {heads} heads + router on gate/up/down vs a LoRA of matched rank")
    configs = {"tiny random Llama": toy("lora")[0].config, "Qwen2.5-3B": ModelConfig.from_hf_dict(QWEN25_3B)}
    for label, cfg in configs.items():
        with torch.device("meta"):  # shapes only, no weights
            base, hydra = CausalLM(cfg), apply_adapter(CausalLM(cfg), "hydra", rank=r, heads=heads, targets=MLP)
        shapes = [(m.in_features, m.out_features) for n, m in base.named_modules()
                  if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in MLP]
        budget = sum(r * d_in + heads * d_out * r + heads * d_in for d_in, d_out in shapes)   # A + B_i + W_r
        per_rank = sum(d_in + d_out for d_in, d_out in shapes)
        row = out[label] = {"modules": len(shapes), "budget_by_hand": budget,
                            "count_trainable": count_trainable(hydra), "per_rank": per_rank,
                            "rank_by_hand": round(budget / per_rank),
                            "rank_for_budget": rank_for_budget(cfg, MLP, budget)}
        print(f"  {label}: {len(shapes)} modules, Σ[r·d_in + N·r·d_out + N·d_in] = {budget:,} (count_trainable "
              f"{row['count_trainable']:,}); a LoRA rank costs Σ(d_in + d_out) = {per_rank:,}, so the matched rank is "
              f"round({budget:,} / {per_rank:,}) = {row['rank_by_hand']} (rank_for_budget {row['rank_for_budget']})")
    return pinned({**out, "rank": r, "heads": heads}, "tests/test_adapters.py::test_rank_for_budget",
                  "tests/test_adapters.py::test_parameter_counts_match_methods_table")


mechanism_toy = toy_mechanism()

# %% [markdown]
# ## 1. Accuracy, beside the base model and the majority label (a row tests nothing unless clearly above base)
# The trainable column shows the budgets match, to within one rank step of the matched LoRA.

# %%
c = claim_grids(args.tiny, args.rerun).read_or_stop("3")
ranks = {k: rs[0]["options"]["rank"] for k, rs in c.runs.items() if rs}
show("suite average accuracy, mean ± SE over seeds", accuracy_table(c, LABELS))
show("per task (%)", task_table(c, LABELS))

# %% [markdown]
# ## 2. Is the matched LoRA as good? An equivalence, judged by its interval (claims.equivalence_verdict)
# Inside ±1 point "equivalent", above −1 "not worse", under −1 "worse". One task's accuracy has a binomial SE of
# about 50/√n points on n test examples, so ±1 needs a large test set and many seeds.

# %%
show("matched LoRA − multi-head (points)", comparison_table(c))

# %% [markdown]
# ## 3. Where the capacity goes: the entropy effective rank exp(H(σ/Σσ)) of ΔW
# A shared A caps Σ_i ω_i(x) B_i A at rank r = 4 whatever the heads; R-LoRA can show 8 (plus its compensation C).

# %%
LIMIT = {"hydra": 4, "rlora": 8}
vals = {k: list(c.values(k, lambda r: r["analysis"].get("effective_rank_mean")).values()) for k in LABELS}
eff = {k: mean_se(v) for k, v in vals.items() if v}
show("effective rank of ΔW (mean over modules; ± SE over seeds)", markdown(
    ["method", "seeds", "effective rank", "at most"],
    [[name(k), str(len(vals[k])), pm(*eff[k], 2), str(LIMIT.get(k, ranks.get(k)))] for k in eff])
     if eff else "(not measured yet)")

# %% Plot: suite average per method, the paired differences (±1 point band), the effective rank
def draw(plt):
    fig, ax = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1, 1.2, 0.8]})
    if c.report["comparisons"]:
        ax[1].axvspan(-1, 1, color="palegreen", alpha=0.3, label="±1 point")
    accuracy_panels(ax[0], ax[1], c, LABELS, title="matched LoRA − multi-head, 95% CI")
    value_bars(ax[2], eff, "effective rank of ΔW (dashed: the most it can be)", "effective rank")
    for i, k in enumerate(eff):
        ax[2].plot([i - 0.4, i + 0.4], [LIMIT.get(k, ranks[k])] * 2, "k--", lw=1)
    return fig


finish(args, "05_capacity", {"mechanism": mechanism_toy, "claims": {"3": c.to_json()}, "ranks": ranks,
                             "effective_rank": eff, "paper": {"Table 3, Qwen2.5-7B BBH": paper.TABLE3_7B}},
       draw, f"05 capacity over architecture: {suite_text(c)}")
