"""Tutorial 08 — claim: "R-LoRA's two ingredients each improve HydraLoRA" (METHODS.md §7 claim 8, §2.5, §6.1).

R-LoRA is HydraLoRA plus two changes, both aimed at making the heads differ (METHODS §2.5):

    multi-head dropout ("+MT")    the dropout moves after the shared A, one independent mask per head, so the heads
                                  see different inputs and get different gradients
    multi-head random init        the heads start as independent random matrices instead of all zero (a frozen
    ("+Init")                     compensation C keeps the initial function close to the base model)

The R-LoRA paper's ablation (its Table 4, Qwen2.5-0.5B, 5 tasks; METHODS §6.1) adds them one at a time:

    HydraLoRA    72.69
    +MT          73.02
    +Init        72.98
    R-LoRA       73.59   (both)

Align-LoRA's reading (tutorials 03-05) is that whatever the heads do, the adapter behaves much like one LoRA. Here
we run the same four-way ablation with train.py's loop: all four are `--adapter rlora` with the ingredients switched
by `--adapter-options multi_head_dropout=...,random_init=...`, so the scaling (R-LoRA's α/√r), router, rank and
heads are the same and only the ingredient changes (tests/test_adapters.py::test_rlora_without_its_ingredients_is_hydra
checks that with both off it is HydraLoRA exactly). For each run: accuracy on the same test examples, and the
mean inter-head cosine similarity of B (what the ingredients are meant to lower; nanoalign.analysis,
tests/test_analysis.py::test_head_cosine_similarity_matches_pairwise_loop).

    python tutorials/08_rlora_ingredients.py          # smollm2-135m, sst2/cola/piqa/siqa/openbookqa from
                                                      # ../shared/data, 25 steps x 3 seeds x 4 setups, 24 test
                                                      # examples per task; 10 min on 2 CPU cores
    python tutorials/08_rlora_ingredients.py --tiny   # tiny random model, builtin suite, 3 steps x 2 seeds
    python tutorials/08_rlora_ingredients.py --full   # R-LoRA's ablation setting: Qwen2.5-0.5B, rank 4, 5 heads (its
                                                      # script's default), lr 2e-4, 10 examples per task per step,
                                                      # 2000 steps, 11 real tasks, 200 test examples; a GPU box

Tests behind the mechanisms: tests/test_adapters.py::test_forward_matches_reference_equation (cases rlora,
rlora-mt-only, rlora-init-only), ::test_dropout_masks_shared_or_per_head,
::test_random_init_heads_differ_and_compensation,
tests/test_train.py::test_adapter_options_reach_the_adapter_and_the_saved_config.

Writes <out>/08_rlora_ingredients.json and, with matplotlib, 08_rlora_ingredients.png.
"""

# %% [setup]
import statistics
import tempfile
import time
from pathlib import Path

from common import MLP, Experiment, add_training_flags, bar_plot, judge, machine, parser, paper_plot, pyplot, \
    save_figure, spread, write_json

from nanoalign.analysis import head_cosine_similarity

p = add_training_flags(parser(__doc__), steps=(25, 3, 2000), seeds=(3, 2))
args = p.parse_args()
if args.full:
    args.model = "qwen2.5-0.5b"
RANK, HEADS = 4, (5 if args.full else 3)          # R-LoRA's script: r=4, lora_b_nums=5; 3 heads as tutorials 03-05
PAPER = {"hydra": 72.69, "hydra+mt": 73.02, "hydra+init": 72.98, "rlora": 73.59}   # METHODS §6.1 Table 4
t_start = time.perf_counter()

# %% [markdown]
# ## 1. The four setups
# One adapter class, R-LoRA (rank 4, α 32, s = α/√r, dropout 0.1, router, gate/up/down), with its two ingredients
# switched on and off. "hydra" here is HydraLoRA at R-LoRA's scaling: zero-init heads, one dropout mask on x.

# %%
full = dict(lr=2e-4, batch_per_task=10, max_per_task=0) if args.full else {}
INGREDIENTS = {"hydra": "multi_head_dropout=false,random_init=false",
               "hydra+mt": "multi_head_dropout=true,random_init=false",
               "hydra+init": "multi_head_dropout=false,random_init=true",
               "rlora": "multi_head_dropout=true,random_init=true"}
SETUPS = {k: dict(adapter="rlora", rank=RANK, heads=HEADS, adapter_options=v, **full) for k, v in INGREDIENTS.items()}

# %% [markdown]
# ## 2. Train, score, and measure the heads: setups x seeds
# After training, per (layer, module) the mean pairwise cosine similarity of the heads B_i, averaged over modules:
# 1 means the heads are one matrix (the adapter is a single LoRA with a router-weighted scalar).

# %%
def heads(label, model, result):
    cos = head_cosine_similarity(model)
    return {"head_cosine": statistics.mean(cos.values())}


with tempfile.TemporaryDirectory(prefix="nanoalign-08-") as tmp:
    if not (args.eval_max or args.tiny or args.full):
        args.eval_max = 24
    exp = Experiment(args, steps=(25, 3, 2000), seeds=(3, 2), tmp=tmp)
    rows = exp.run(SETUPS, analyse=heads)
    base = exp.base_accuracy()
summary = exp.summarise(rows)
exp.print_table({"base (no training)": {k: spread([v]) for k, v in base.items()}, **summary}, paper=PAPER)
cosine = {label: spread([r["head_cosine"] for r in rs]) for label, rs in rows.items()}
print("\nmean inter-head cosine similarity of B after training (mean ± std over seeds):")
for label, c in cosine.items():
    print(f"  {label:12s} {c['mean']:.3f} ± {c['std']:.3f}")

# %% [markdown]
# ## 3. Verdict, claim by claim
# Claim 8: each ingredient alone beats HydraLoRA (paper +0.33 and +0.29), and both together beat either alone
# (paper +0.57 over +MT, +0.61 over +Init). Verdict words as in tutorial 04: reproduced / same direction, within
# noise / opposite, within noise / contradicted (differences of seed means, ± their standard error over seeds).

# %%
avg = {k: s["average"] for k, s in summary.items()}
CLAIMS = [("claim8_mt_vs_hydra", "hydra+mt", "hydra"), ("claim8_init_vs_hydra", "hydra+init", "hydra"),
          ("claim8_both_vs_hydra", "rlora", "hydra"), ("claim8_both_vs_mt", "rlora", "hydra+mt"),
          ("claim8_both_vs_init", "rlora", "hydra+init")]
verdict = {key: judge(key, avg[a], avg[b], paper_diff=PAPER[a] - PAPER[b]) for key, a, b in CLAIMS}
verdict["mechanism_mt_lowers_head_cosine"] = judge("head cosine, +MT - hydra", cosine["hydra+mt"], cosine["hydra"],
                                                   expect_higher=False)
verdict["mechanism_init_lowers_head_cosine"] = judge("head cosine, +Init - hydra", cosine["hydra+init"],
                                                     cosine["hydra"], expect_higher=False)
verdict["ranking"] = sorted(avg, key=lambda k: -avg[k]["mean"])
print(f"ranking by mean average accuracy: {' > '.join(verdict['ranking'])}   "
      f"(paper: rlora > hydra+mt > hydra+init > hydra)")

results = {"meta": machine(), **exp.describe(), "rank": RANK, "heads": HEADS, "targets": list(MLP),
           "ingredients": INGREDIENTS, "paper": PAPER,
           "paper_setting": "R-LoRA Table 4: Qwen2.5-0.5B, 5 tasks (names not given), r=4, MLP, R-LoRA's script",
           "base": base, "runs": rows, "summary": summary, "head_cosine": cosine, "verdict": verdict,
           "wall_s": round(time.perf_counter() - t_start, 1)}
out = Path(args.out)
print(f"\nwrote {write_json(out / '08_rlora_ingredients.json', results)} ({results['wall_s']} s)")

# %% [markdown]
# How to read it (our default run, commit 91b3967, 10.0 min): all four end 7-8 points BELOW the base model (48.3%),
# at 40.6-41.1% with a seed spread of 3-8 points, and the four means lie within 0.6 points of each other: claim 8
# is not resolved at this scale (the signs came out hydra ≥ +Init ≥ +MT ≥ R-LoRA, all within noise). What does
# answer here is what each ingredient does to the heads: zero-init heads under a router become near-copies
# (cosine 0.970); per-head dropout alone pulls them apart only a little in 25 steps (0.912); the random init is
# what keeps them different (0.011, and 0.010 with both), because the heads start orthogonal and 25 small updates
# do not undo that. Whether "different heads" buys accuracy is exactly what Align-LoRA disputes (tutorials 03-05).

# %% [markdown]
# ## Plot: accuracy beside the paper's Table 4, and the heads' similarity

# %%
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    bar_plot(ax[0], summary, rows, title=f"ours: {exp.describe()['model']}, {exp.steps} steps, "
                                         f"{len(exp.seeds)} seeds", base=base["average"])
    paper_plot(ax[1], PAPER, "paper (R-LoRA Table 4, Qwen2.5-0.5B)")
    labels = list(cosine)
    ax[2].bar(range(len(labels)), [cosine[k]["mean"] for k in labels], yerr=[cosine[k]["std"] for k in labels],
              color="lightsteelblue", capsize=3)
    ax[2].set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax[2].set(ylabel="mean inter-head cosine of B", ylim=(min(0, *[cosine[k]["min"] for k in labels]) - 0.05, 1.05),
              title="how alike the heads end up")
    fig.suptitle(f"08 R-LoRA's ingredients on HydraLoRA (rank {RANK}, {HEADS} heads, gate/up/down)", fontsize=10)
    print(f"wrote {save_figure(fig, out / '08_rlora_ingredients.png')}")
