"""Tutorial 04 — claims 1-2: "a simplified multi-head LoRA beats the complex ones" (METHODS.md §7, §6.2).

Align-LoRA's Table 1 (Qwen2.5-3B; QNLI, PIQA, WinoGrande, ARC, GSM8K; rank 4, 3 heads, gate/up/down):

    HydraLoRA                74.04   shared A, 3 zero-init heads, softmax router on the token
    HydraLoRA w/o Router     73.58   the same heads summed: provably one LoRA (tutorial 02)
    R-LoRA                   74.67   HydraLoRA + per-head dropout after A + random head init
    M-LoRA                   75.45   R-LoRA without the router: the simplest, with the fewest parameters

The paper reads this as the "multi-head paradox": removing the router (the part meant to specialise heads) does not
hurt, and the heads end up alike anyway (tutorial 03). Claim 1: M-LoRA ≥ R-LoRA and ≥ HydraLoRA. Claim 2:
HydraLoRA w/o Router is no better than HydraLoRA.

This tutorial trains nothing: it renders the cached grid "1-2" of experiments/claims.py (the four methods at the
paper's configuration, the same seeds, budget and test set); its modes are the claim readers' (tutorials/common.py).
Tests behind it: tests/test_adapters.py::test_forward_matches_reference_equation,
::test_hydra_without_router_keeps_identical_heads (claim 2's symmetry), tests/test_eval.py, tests/test_stats.py,
tests/test_grid.py, tests/test_claims.py.
"""

# %% [setup]
from common import claim_grids, finish, parse_args

from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, comparison_table, suite_text, task_table

args = parse_args(__doc__, ["1-2"])
LABELS = ["hydra", "hydra-norouter", "rlora", "mlora"]

# %% [markdown]
# ## 1. Read the grid
# The four rows differ in the adapter kind only (rank 4, 3 heads, α 32, dropout 0.1, gate/up/down). A seed changes
# init, dropout masks and data order, never the test set, so methods compare seed by seed and example by example.

# %%
grids = claim_grids(args.tiny, args.rerun)
c = grids.read_or_stop("1-2")

# %% [markdown]
# ## 2. Accuracy, beside the base model and the majority label
# An accuracy means something only next to the untrained base model's and the majority label's share: a method
# not clearly above the base model ("vs base", paired over seeds and examples, 95%) does not test the claim at this
# budget. "collapsed in": tasks where one prediction covers > 90% of the examples, so the accuracy is that label's
# share, not a skill. M-LoRA and HydraLoRA w/o Router have no router, so fewer parameters (METHODS §1).

# %%
print("\nsuite average accuracy, mean ± SE over seeds:\n")
print(accuracy_table(c, LABELS))

# %% [markdown]
# ## 3. Per task, in the shape of the paper's Table 1
# Our cells are mean ± SE over seeds; where one of our tasks is a column of the paper's table, the paper's cell
# follows after " / ". The paper's average is over its five tasks, ours over our suite, so compare the ordering of
# the rows and the size of the gaps, not the levels: a 135M model is not a 3B one.

# %%
print("\nper task (%), ours / paper:\n")
print(task_table(c, LABELS, paper.TABLE1, paper.TABLE1_COLUMN_OF))

# %% [markdown]
# ## 4. The claimed differences, with their intervals
# Claim 1: M-LoRA − R-LoRA and M-LoRA − HydraLoRA (paper +0.78 and +1.41 points). Claim 2: HydraLoRA w/o Router −
# HydraLoRA (paper −0.46). Each difference of suite averages has two 95% intervals (experiments/stats.py): the
# paired bootstrap over (seed, example), which sees seed and test-set noise, and the seed-level t interval (the
# seed is the unit of replication). "reproduced": both exclude 0 on the paper's side; "contradicted": on the other;
# "borderline": only one does; else "same direction" / "opposite", "not resolved".

# %%
print("\nclaimed differences (points):\n")
print(comparison_table(c))
# The control rows repeat claims 1 and 2 with one thing changed: the heads averaged instead of summed (step size),
# or R-LoRA's released-code init.

# %% [markdown]
# The mechanism behind claim 2 needs no statistics: HydraLoRA w/o Router *is* a rank-4 LoRA (tutorial 02: its
# heads stay bit-identical, and tutorial 03 reads their cosine of exactly 1 from this same grid), so any gap between
# it and HydraLoRA is what the router adds.

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
