"""Tutorial 04 — claims 1-2: "a simplified multi-head LoRA beats the complex ones" (METHODS.md §7, §6.2).

Align-LoRA's Table 1 (Qwen2.5-3B; QNLI, PIQA, WinoGrande, ARC, GSM8K; rank 4, 3 heads, gate/up/down):

    HydraLoRA                74.04   shared A, 3 zero-init heads, softmax router on the token
    HydraLoRA w/o Router     73.58   the same heads summed: provably one LoRA (tutorial 02)
    R-LoRA                   74.67   HydraLoRA + per-head dropout after A + random head init
    M-LoRA                   75.45   R-LoRA without the router: the simplest, with the fewest parameters

The "multi-head paradox": removing the router does not hurt, and the heads end up alike anyway (tutorial 03).
Claim 1: M-LoRA ≥ R-LoRA and ≥ HydraLoRA. Claim 2: HydraLoRA w/o Router is no better than HydraLoRA. This renders
grid "1-2" of experiments/claims.py (the four methods, same seeds, budget and test set).
"""

# %% [setup]
from common import claim_grids, finish, parse_args

from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, comparison_table, suite_text, task_table

args = parse_args(__doc__, ["1-2"])
LABELS = ["hydra", "hydra-norouter", "rlora", "mlora"]

# %% [markdown]
# ## 1. Read the grid: the rows differ in the adapter kind only; a seed changes init, dropout and data order, never
# the test set, so methods compare seed by seed and example by example

# %%
grids = claim_grids(args.tiny, args.rerun)
c = grids.read_or_stop("1-2")

# %% [markdown]
# ## 2. Accuracy, beside the base model and the majority label
# A method not clearly above the base model ("vs base", paired, 95%) does not test the claim at this budget;
# "collapsed in": one prediction covers > 90% of a task's examples, so its accuracy is that label's share.

# %%
print("\nsuite average accuracy, mean ± SE over seeds:\n")
print(accuracy_table(c, LABELS))

# %% [markdown]
# ## 3. Per task, in the shape of the paper's Table 1 (its cell after " / " where the task is one of its columns)
# Compare the ordering of the rows and the size of the gaps, not the levels: a 135M model is not a 3B one.

# %%
print("\nper task (%), ours / paper:\n")
print(task_table(c, LABELS, paper.TABLE1, paper.TABLE1_COLUMN_OF))

# %% [markdown]
# ## 4. The claimed differences: claim 1 M-LoRA − R-LoRA, − HydraLoRA (paper +0.78, +1.41); claim 2 w/o Router −
# HydraLoRA (−0.46). Two 95% intervals each (experiments/stats.py): the paired bootstrap over (seed, example) and
# the seed-level t interval; "reproduced" when both exclude 0 on the paper's side, "borderline" when one does.

# %%
print("\nclaimed differences (points):\n")
print(comparison_table(c))
# The control rows repeat claims 1 and 2 with one thing changed: the heads averaged instead of summed (step size),
# or R-LoRA's released-code init.

# %% [markdown]
# Claim 2's mechanism needs no statistics: HydraLoRA w/o Router *is* a rank-4 LoRA (tutorials 02, 03), so any gap
# between it and HydraLoRA is what the router adds.

# %% [markdown]
# ## Plot: suite average per method (± SE, seeds as dots) and the paired differences beside the paper's

# %%
def draw(plt):
    fig, ax = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    accuracy_panels(ax[0], ax[1], c, LABELS)
    fig.suptitle(f"04 simplified vs complex multi-head LoRA (rank 4, 3 heads): {suite_text(c)}", fontsize=8)
    fig.tight_layout()
    return fig


finish(args, "04_simplified_multi_head", {"claims": {"1-2": c.to_json()}, "paper": paper.TABLE1}, draw)
