"""Tutorial 08 — claim 8: "R-LoRA's two ingredients each improve HydraLoRA" (METHODS.md §7 claim 8, §2.5, §6.1).

R-LoRA is HydraLoRA plus two changes that make the heads differ (METHODS §2.5): multi-head dropout ("+MT", one
dropout mask per head after the shared A) and random head init ("+Init", with a frozen compensation C). The R-LoRA
paper's Table 4 (Qwen2.5-0.5B, 5 unnamed tasks; METHODS §6.1) adds them one at a time, each above HydraLoRA.

This reads grid "8" of experiments/claims.py: the four rows as R-LoRA (s = α/√r, rank 4, 3 heads, gate/up/down)
with `--adapter-options` switching ingredients off, so each comparison changes one ingredient and not the scale
(both off is exactly HydraLoRA at α/√r: tests/test_adapters.py::test_rlora_without_its_ingredients_is_hydra).
"""

# %% [setup]
import torch
import torch.nn.functional as F
from common import claim_grids, finish, lm_loss, parse_args, pinned, toy

from experiments import paper
from experiments.reports import accuracy_panels, accuracy_table, comparison_table, head_cosine, markdown, name, pm, \
    print_paired, seed_pairs, show, suite_text, task_table, value_bars
from experiments.stats import mean_se
from nanoalign.adapters import adapter_modules

args = parse_args(__doc__, ["8"])
LABELS = ["hydra-rs", "hydra+mt", "hydra+init", "rlora"]

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds: the heads' gradients at step 0
# The four rows from one seed (same router, batch and dropout draws), one backward of the LM loss. For layer 0
# up_proj: the heads' gradient cosine, their largest difference under a uniform router (zeroed: ω_i = 1/N) relative
# to the largest gradient, and the heads' own cosine (zero heads have none).

# %%
OPTIONS_08 = {"hydra-rs": {"multi_head_dropout": False, "random_init": False}, "hydra+mt": {"random_init": False},
              "hydra+init": {"multi_head_dropout": False}, "rlora": {}}


def toy_mechanism(module="model.layers.0.mlp.up_proj"):
    """What +MT and +Init do to one toy module's heads at step 0."""
    def pair_cos(t):  # mean over i < j of cos(vec t_i, vec t_j)
        u = F.normalize(t.flatten(1), dim=1)
        i, j = torch.triu_indices(len(u), len(u), 1)
        return (u @ u.T)[i, j].mean().item()

    out = {}
    for label, options in OPTIONS_08.items():
        model, batches, _ = toy("rlora", dropout=0.1, **options)
        b, heads = next(batches), model.get_submodule(module).lora_B.weight
        row = out[label] = {"head_cosine_at_init": None if heads.abs().max() == 0 else pair_cos(heads.detach())}
        for router in ("kaiming", "uniform"):
            if router == "uniform":
                with torch.no_grad():
                    for _, m in adapter_modules(model):
                        m.lora_router.weight.zero_()
            model.zero_grad()
            torch.manual_seed(1)  # the same dropout masks in every row
            lm_loss(model, b).backward()
            g = heads.grad
            row[f"grad_cosine_{router}_router"] = pair_cos(g)
            row[f"grad_spread_{router}_router"] = ((g - g[:1]).abs().max() / g.abs().max()).item()
    print(f"mechanism (tiny random Llama, {module}, step 0): head gradients and heads, per ingredient")
    for label, row in out.items():
        init = "zero" if row["head_cosine_at_init"] is None else f"{row['head_cosine_at_init']:+.3f}"
        print(f"  {name(label):18s} gradient cosine {row['grad_cosine_kaiming_router']:.4f} (router as initialised); "
              f"uniform router: max|g_i − g_1|/max|g| = {row['grad_spread_uniform_router']:.2e}; "
              f"heads' cosine {init}")
    return pinned({"module": module, "rows": out},
                  "tests/test_adapters.py::test_head_gradients_at_a_uniform_router_differ_only_with_per_head_dropout",
                  "tests/test_adapters.py::test_dropout_masks_shared_or_per_head",
                  "tests/test_adapters.py::test_random_init_heads_differ_and_compensation")


mechanism_toy = toy_mechanism()

# %% [markdown]
# ## 1. Accuracy of the four rows, beside the base model and the majority label; the claimed differences: +MT,
# +Init, R-LoRA − HydraLoRA

# %%
c = claim_grids(args.tiny, args.rerun).read_or_stop("8")
show("suite average accuracy, mean ± SE over seeds", accuracy_table(c, LABELS))
show("per task (%); R-LoRA's Table 4 names no tasks, so its averages only",
     task_table(c, LABELS, {k: {"Avg": v} for k, v in paper.RLORA_TABLE4.items()}))
show("claimed differences (points)", comparison_table(c))

# %% [markdown]
# ## 2. What each ingredient does to the heads: mean inter-head cosine of B after training, paired over seeds
# (t interval, 95%); claimed: the ingredient lowers it (zero heads under a router take nearly the same Adam step)

# %%
heads = {k: mean_se(list(v.values())) for k in LABELS if (v := c.values(k, head_cosine))}
show("mean inter-head cosine of B (± SE over seeds)", markdown(["method", "seeds", "head cosine"], [
    [name(k), str(len(c.values(k, head_cosine))), pm(*heads[k], 3)] for k in heads]) if heads else "(not measured yet)")
mechanism = seed_pairs(c, [("hydra+mt", "hydra-rs"), ("hydra+init", "hydra-rs")], head_cosine, False)
print_paired(mechanism, "head cosine", "lower")

# %% Plot: accuracy per row, the paired differences beside the paper's, and the heads' similarity
def draw(plt):
    fig, ax = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1, 1.2, 0.8]})
    accuracy_panels(ax[0], ax[1], c, LABELS)
    value_bars(ax[2], heads, "how alike the heads end up (± SE)", "mean inter-head cosine of B")
    ax[2].set_ylim(-0.05, 1.05)
    return fig


finish(args, "08_rlora_ingredients", {"mechanism": mechanism_toy, "claims": {"8": c.to_json()}, "head_cosine": heads,
                                      "head_cosine_paired": mechanism, "paper": {"R-LoRA Table 4": paper.RLORA_TABLE4}},
       draw, f"08 R-LoRA's ingredients: {suite_text(c)}")
