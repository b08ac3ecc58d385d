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
import torch
from common import claim_grids, finish, parse_args

from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, comparison_table, show, suite_text, task_table
from nanoalign.adapters import HydraNoRouterLinear, MLoRALinear

args = parse_args(__doc__, ["1-2"])
LABELS = ["hydra", "hydra-norouter", "rlora", "mlora"]
TESTS_04 = ["tests/test_adapters.py::test_summed_heads_step_n_squared_as_far_as_averaged",
            "tests/test_adapters.py::test_forward_matches_reference_equation"]

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds
# M-LoRA's ΔW = s·Σ_i c_i B_i A − C (METHODS §2.6; the constant C cancels the random init, so ΔW starts at 0).
# Summed heads (c_i = 1, the default) vs averaged (c_i = 1/N): each head's gradient carries c_i and the N heads add
# up with c_i again, so one SGD step moves ΔW N² times as far at the same learning rate. That is why claim 1 has a
# heads-averaged control row: a summed M-LoRA trains at a larger step than the methods it is compared with.

# %%
def delta_w_moved(cls, reduction, heads=3):
    """How far one SGD step (lr 0.01, toy loss, seed 0) moves the module's ΔW."""
    torch.manual_seed(0)
    m = cls(torch.nn.Linear(32, 32), rank=4, alpha=16, heads=heads, head_reduction=reduction)
    before = m.delta_weight().detach()
    m(torch.randn(64, 32)).pow(2).mean().backward()
    torch.optim.SGD(m.parameters(), lr=1e-2).step()  # skips the frozen base (no gradient)
    return (m.delta_weight().detach() - before).norm().item()


for cls in (HydraNoRouterLinear, MLoRALinear):
    moved = {r: delta_w_moved(cls, r) for r in ("sum", "mean")}
    print(f"{cls.__name__}, 3 heads: |ΔW step| summed {moved['sum']:.2e}, averaged {moved['mean']:.2e}, "
          f"ratio {moved['sum'] / moved['mean']:.2f} (N² = 9)")
print("pinned by", ", ".join(TESTS_04))

# %% [markdown]
# ## 1. Accuracy, beside the base model and the majority label
# The rows differ in the adapter kind only; a seed changes init, dropout and data order, never the test set, so
# methods compare seed by seed and example by example. A method not clearly above the base model ("vs base", paired,
# 95%) does not test the claim at this budget; "collapsed in": one prediction covers > 90% of a task's examples, so
# its accuracy is that label's share.

# %%
c = claim_grids(args.tiny, args.rerun).read_or_stop("1-2")
show("suite average accuracy, mean ± SE over seeds", accuracy_table(c, LABELS))

# %% [markdown]
# ## 2. Per task, in the shape of the paper's Table 1 (its cell after " / " where the task is one of its columns)
# Compare the ordering of the rows and the size of the gaps, not the levels: a 135M model is not a 3B one.

# %%
show("per task (%), ours / paper", task_table(c, LABELS, paper.TABLE1, paper.TABLE1_COLUMN_OF))

# %% [markdown]
# ## 3. The claimed differences: claim 1 M-LoRA − R-LoRA, − HydraLoRA; claim 2 w/o Router − HydraLoRA
# Two 95% intervals each (experiments/stats.py): the paired bootstrap over (seed, example) and the seed-level t
# interval; "reproduced" when both exclude 0 on the paper's side, "borderline" when one does.
# The control rows repeat claims 1 and 2 with one thing changed: the heads averaged instead of summed (step size),
# or R-LoRA's released-code init. Claim 2's mechanism needs no statistics: HydraLoRA w/o Router *is* a rank-4 LoRA
# (tutorials 02, 03), so any gap between it and HydraLoRA is what the router adds.

# %%
show("claimed differences (points)", comparison_table(c))

# %% Plot: suite average per method (± SE, seeds as dots) and the paired differences beside the paper's
def draw(plt):
    fig, ax = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.2]})
    accuracy_panels(ax[0], ax[1], c, LABELS)
    return fig


finish(args, "04_simplified_multi_head", {"claims": {"1-2": c.to_json()}, "paper": paper.TABLE1}, draw,
       f"04 simplified vs complex multi-head LoRA (rank 4, 3 heads): {suite_text(c)}")
