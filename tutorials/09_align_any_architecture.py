"""Tutorial 09 — claim: "alignment is architecture-agnostic" (METHODS.md §7 claim 9, §3).

Align-LoRA's appendix (Table 9, values not found; METHODS §8) adds its alignment loss to the multi-head adapters it
argues against, R-LoRA and M-LoRA, and reports that they improve too: the loss acts on the shared A's output, which
every member of the family has, so it should not care what sits after A. Here we train R-LoRA and M-LoRA with and
without the symmetric-KL alignment loss (λ = 0.1, the paper's best; `train.py --align-any`), 3 seeds each, score
them on the same test examples, and probe what the loss does to the tasks' A-outputs on held-out prompts, as
tutorial 06 does for a plain LoRA.

    python tutorials/09_align_any_architecture.py          # smollm2-135m, sst2/cola/piqa/siqa/openbookqa from
                                                           # ../shared/data, 25 steps x 3 seeds x 4 setups, 24 test
                                                           # examples per task; 10 min on 2 CPU cores
    python tutorials/09_align_any_architecture.py --tiny   # tiny random model, builtin suite, 3 steps x 2 seeds
    python tutorials/09_align_any_architecture.py --full   # Qwen2.5-3B, rank 4, 3 heads, lr 2e-4, 10 examples per
                                                           # task per step, 2000 steps, 11 real tasks; a GPU box

The A-output aligned is A x for R-LoRA and M-LoRA (before their per-head dropout; METHODS §3.1), reported by the
adapters themselves (tests/test_adapters.py::test_forward_matches_reference_equation checks it); the loss is
nanoalign.align.alignment_loss (tests/test_align.py), added by train.py exactly as for `--adapter align`
(tests/test_train.py).

Writes <out>/09_align_any_architecture.json and, with matplotlib, 09_align_any_architecture.png.
"""

# %% [setup]
import tempfile
import time
from pathlib import Path

from common import MLP, PROBE_KEYS, Experiment, add_training_flags, bar_plot, judge, machine, parser, \
    print_representation, probe_batch, pyplot, representation, save_figure, spread, write_json

p = add_training_flags(parser(__doc__), steps=(25, 3, 2000), seeds=(3, 2))
p.add_argument("--probe", type=int, default=None, help="held-out prompts per task for the representation probe "
               "(default 16; --tiny 4)")
args = p.parse_args()
if args.full:
    args.model = "qwen2.5-3b"
RANK, HEADS, LAMBDA = 4, 3, 0.1                  # Align-LoRA Table 1's multi-head setting; λ of tutorial 06
t_start = time.perf_counter()

# %% [markdown]
# ## 1. The setups
# R-LoRA and M-LoRA as in tutorial 04 (rank 4, 3 heads, α 32, dropout 0.1, gate/up/down), each with and without
# the KL alignment loss at λ = 0.1. Same seeds (same data order and init), same test set.

# %%
full = dict(lr=2e-4, batch_per_task=10, max_per_task=0) if args.full else {}
SETUPS = {}
for kind in ("rlora", "mlora"):
    SETUPS[kind] = dict(adapter=kind, rank=RANK, heads=HEADS, **full)
    SETUPS[f"{kind}+align"] = dict(adapter=kind, rank=RANK, heads=HEADS, align_any=True, align_loss="kl",
                                   align_lambda=LAMBDA, **full)

# %% [markdown]
# ## 2. Train, score and probe every setup x seed
# The probe (common.representation, shared with tutorial 06): held-out prompts, each module's A-output averaged
# over the tokens of an example, the between/within task separation per module averaged over modules, and the KL
# alignment loss on those held-out A-outputs.

# %%
with tempfile.TemporaryDirectory(prefix="nanoalign-09-") as tmp:
    if not (args.eval_max or args.tiny or args.full):
        args.eval_max = 24
    exp = Experiment(args, steps=(25, 3, 2000), seeds=(3, 2), tmp=tmp)
    batch = probe_batch(exp, args.probe or (4 if args.tiny else 16))

    def analyse(label, model, result):
        rep = representation(model, batch, False, exp.autocast)
        return {k: rep[k] for k in PROBE_KEYS}

    rows = exp.run(SETUPS, analyse=analyse)
    base = exp.base_accuracy()
summary = exp.summarise(rows)
exp.print_table({"base (no training)": {k: spread([v]) for k, v in base.items()}, **summary})
rep = {label: {k: spread([r[k] for r in rs]) for k in PROBE_KEYS} for label, rs in rows.items()}
print_representation(rep, len(batch[2]))

# %% [markdown]
# ## 3. Verdict
# Claim 9: adding the alignment loss improves R-LoRA and M-LoRA (the paper gives no number we could find, only the
# direction). Mechanism: it lowers the held-out task separation of the A-outputs, as it does for LoRA (tutorial 06).
# Verdict words as in tutorial 04.

# %%
avg = {k: s["average"] for k, s in summary.items()}
verdict = {}
for kind in ("rlora", "mlora"):
    verdict[f"claim9_{kind}"] = judge(f"{kind}+align - {kind}", avg[f"{kind}+align"], avg[kind])
    verdict[f"mechanism_separation_{kind}"] = judge(f"held-out task separation, {kind}+align - {kind}",
                                                    rep[f"{kind}+align"]["sep_ratio"], rep[kind]["sep_ratio"],
                                                    expect_higher=False)

results = {"meta": machine(), **exp.describe(), "rank": RANK, "heads": HEADS, "lambda": LAMBDA, "targets": list(MLP),
           "lambda_convention": "mean over task pairs and modules (tutorial 06); paper's λ = ours / pairs",
           "paper": "Align-LoRA appendix Table 9: alignment added to R-LoRA / M-LoRA improves them; values not found",
           "base": base, "runs": rows, "summary": summary, "representation": rep, "verdict": verdict,
           "wall_s": round(time.perf_counter() - t_start, 1)}
out = Path(args.out)
print(f"\nwrote {write_json(out / '09_align_any_architecture.json', results)} ({results['wall_s']} s)")

# %% [markdown]
# How to read it (our default run, commit 91b3967, 9.6 min): accuracy does not answer claim 9 at this scale. All
# four end 8-10 points below the base model (48.3%); alignment moved R-LoRA by -0.56 ± 5.80 and M-LoRA by
# +0.83 ± 3.49 points, both far inside the seed spread. (The R-LoRA runs equal tutorial 08's R-LoRA runs to the
# last digit: same seeds, same code, deterministic on CPU.) The mechanism does carry over from LoRA (tutorial 06):
# on held-out prompts the loss pulls the tasks' A-output clusters together, separation 1.655 -> 1.464 for R-LoRA
# and 1.668 -> 1.556 for M-LoRA, clearly beyond seed noise, with the within-task spread unchanged (0.047, 0.045):
# the loss acts on the shared A whatever sits after it.

# %% [markdown]
# ## Plot: accuracy, and the task separation of the A-outputs

# %%
plt = pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    bar_plot(ax[0], summary, rows, title=f"accuracy: {exp.describe()['model']}, {exp.steps} steps, "
                                         f"{len(exp.seeds)} seeds", base=base["average"])
    labels = list(rep)
    ax[1].bar(range(len(labels)), [rep[k]["sep_ratio"]["mean"] for k in labels],
              yerr=[rep[k]["sep_ratio"]["std"] for k in labels], capsize=3,
              color=["lightsteelblue" if "align" not in k else "salmon" for k in labels])
    ax[1].set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax[1].set(ylabel="between / within task distance", title="held-out task separation of A-outputs")
    fig.suptitle(f"09 alignment on multi-head adapters (rank {RANK}, {HEADS} heads, KL, λ={LAMBDA})", fontsize=10)
    print(f"wrote {save_figure(fig, out / '09_align_any_architecture.png')}")
