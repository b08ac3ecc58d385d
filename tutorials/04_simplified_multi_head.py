"""Tutorial 04 — claims 1-2: "a simplified multi-head LoRA beats the complex ones" (METHODS.md §7, §6.2).

Align-LoRA's Table 1 (Qwen2.5-3B; QNLI, PIQA, WinoGrande, ARC, GSM8K; rank 4, 3 heads, gate/up/down):

    HydraLoRA                74.04   shared A, 3 zero-init heads, softmax router on the token
    HydraLoRA w/o Router     73.58   the same heads summed: provably one LoRA (tutorial 02)
    R-LoRA                   74.67   HydraLoRA + per-head dropout after A + random head init
    M-LoRA                   75.45   R-LoRA without the router: the simplest, with the fewest parameters

The paper reads this as the "multi-head paradox": removing the router (the part meant to specialise heads) does not
hurt, and the heads end up alike anyway (tutorial 03). Claim 1: M-LoRA ≥ R-LoRA and ≥ HydraLoRA. Claim 2:
HydraLoRA w/o Router is no better than HydraLoRA.

This tutorial trains nothing. It reads the grid "1-2" of experiments/claims.py — the four methods at the paper's
configuration (rank 4, 3 heads, gate/up/down), the same seeds, budget and test set for all, trained once by
`python experiments/claims.py run` and cached in experiments/results/runs/ — and renders it:

    python tutorials/04_simplified_multi_head.py          # read the cached grid: tables and plot in seconds
    python tutorials/04_simplified_multi_head.py --rerun  # train what the cache lacks first (hours on a CPU)
    python tutorials/04_simplified_multi_head.py --tiny   # smoke test: a tiny grid in a temp dir, trained + rendered
    python tutorials/04_simplified_multi_head.py --full   # the paper's setting and how to run it on a GPU box

Tests behind the mechanisms: tests/test_adapters.py::test_forward_matches_reference_equation (each adapter's
equation), ::test_hydra_without_router_keeps_identical_heads (claim 2's symmetry), tests/test_eval.py (the scorers),
tests/test_stats.py (the paired bootstrap and the verdicts), tests/test_grid.py (the cache), tests/test_claims.py
(the claim grids and their report).

Writes <out>/04_simplified_multi_head.json and, with matplotlib, 04_simplified_multi_head.png.
"""

# %% [setup]
from common import claim_grids, finish, parse_args

from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, comparison_table, suite_text, task_table

args = parse_args(__doc__, ["1-2"])
LABELS = ["hydra", "hydra-norouter", "rlora", "mlora"]

# %% [markdown]
# ## 1. Read the grid
# Every run of the grid is one call of train.py's loop and one evaluation of the trained adapter on the grid's
# test set (experiments/grid.py). What differs between the four rows is the adapter kind only: rank 4, 3 heads,
# α 32, dropout 0.1, gate/up/down; the same seeds, so the same data order and, where the init is kaiming, the same
# A. A seed changes init, dropout masks and data order, never the test set, so two methods can be compared seed by
# seed and example by example.

# %%
grids = claim_grids(args.tiny, args.rerun)
c = grids.read_or_stop("1-2")

# %% [markdown]
# ## 2. Accuracy, beside the base model and the majority label
# Every accuracy only means something next to two numbers: the untrained base model's (has training done anything?)
# and the share of the most frequent gold label (what a model that answers one label for everything scores). A
# method whose suite average is not above the base model's by a margin far beyond its noise does not test the
# claim at this budget (issue 14): "vs base" says it, paired over seeds and test examples (95%). "collapsed in"
# lists the tasks where one prediction covers more than 90% of the examples (nanoalign/evaluate.py), in how many
# seeds: there the accuracy is that label's share of the test set, not a skill.
# The trainable count: M-LoRA and HydraLoRA w/o Router have no router, so fewer parameters (METHODS §1).

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
# Printed above, from the cache: how far each method is above the base model and the majority rate, and which
# tasks collapsed or tilted in which seeds (a row not above the base model does not test the claim). SST-2 moves
# with the seed for every method; the paired comparisons below cancel what the seeds share.

# %% [markdown]
# ## 4. The claimed differences, with their intervals
# Claim 1: M-LoRA − R-LoRA and M-LoRA − HydraLoRA (paper +0.78 and +1.41 points). Claim 2: HydraLoRA w/o Router −
# HydraLoRA (paper −0.46). For each: the difference of suite averages, the 95% interval of the paired bootstrap over
# (seed, example) — it sees both the seed noise and the test-set noise (nanoalign/stats.py) — and the seed-level t
# interval (df = seeds − 1: the seed is the unit of replication). Verdict: "reproduced" (the paper's sign, both
# intervals exclude 0), "contradicted" (both exclude 0 on the other side), "borderline" (only one does), "same
# direction, not resolved", "opposite, not resolved".

# %%
print("\nclaimed differences (points):\n")
print(comparison_table(c))
# Printed above, from the cache: both intervals (bootstrap over (seed, example) and the seed-level t) and the
# verdict of each difference, beside the paper's; the README's claim-by-claim reading is generated the same way.
# The control rows repeat claims 1 and 2 with one thing changed: the heads averaged instead of summed (step
# size), or R-LoRA's released-code init.

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
