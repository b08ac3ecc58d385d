"""Tutorial 09 — claim 9: "alignment is architecture-agnostic" (METHODS.md §7 claim 9, §3).

Align-LoRA's appendix (Table 9, values not found; METHODS §8) adds its alignment loss to the multi-head adapters it
argues against, R-LoRA and M-LoRA, and reports that they improve too: the loss acts on the shared A's output,
which every member of the family has, so it should not care what sits after A.

This tutorial trains nothing. It reads the grid "9" of experiments/claims.py: R-LoRA and M-LoRA (rank 4, 3 heads,
gate/up/down; the runs claims 1-2 also use) with and without the symmetric-KL alignment loss at the paper's λ = 0.1
(`train.py --align-any`), the same seeds, budget and test set, and the separation probe of tutorial 06 on each run:
what the loss does to the tasks' A-output clusters on held-out prompts.

    python tutorials/09_align_any_architecture.py          # read the cached grid: tables and plot in seconds
    python tutorials/09_align_any_architecture.py --rerun  # train what the cache lacks first (hours on a CPU)
    python tutorials/09_align_any_architecture.py --tiny   # smoke test: a tiny grid in a temp dir, trained + rendered
    python tutorials/09_align_any_architecture.py --full   # the paper's setting and how to run it on a GPU box

The A-output aligned is A x for R-LoRA and M-LoRA (before their per-head dropout; METHODS §3.1), reported by the
adapters themselves (tests/test_adapters.py::test_forward_matches_reference_equation checks it); the loss is
nanoalign.align.alignment_loss (tests/test_align.py), added by train.py exactly as for `--adapter align`
(tests/test_train.py).

Section 0 runs first, in seconds (every mode but --full): the alignment loss on a toy R-LoRA's A-output (the
tiny random Llama) and where its gradient goes.

Writes <out>/09_align_any_architecture.json and, with matplotlib, 09_align_any_architecture.png.
"""

# %% [setup]
from common import claim_grids, finish, parse_args

from experiments.reports import accuracy_panels, accuracy_table, comparison_table, name, print_paired, probe_table, \
    seed_pairs, sep_ratio, suite_text, task_table, value_bars

args = parse_args(__doc__, ["9"])
LABELS = ["rlora", "rlora+align", "mlora", "mlora+align"]

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds: the loss on R-LoRA's shared A
# R-LoRA's A-output is z = A·x, taken before the per-head dropout, so the alignment loss of tutorial 06 is defined on
# it as on a plain LoRA's. On the tiny random Llama with R-LoRA (dropout 0.1, train mode): z against A·x recomputed
# from the module's input, the loss of one module, and where its gradient goes when it is the only loss: that
# module's A, not its heads B_i nor its router. (Summed over modules, the loss also reaches the B and router of
# modules upstream of later ones, through the residual stream, as for LoRA: nanoalign/align.py.)

# %%
from common import toy

from nanoalign.adapters import adapter_context
from nanoalign.align import alignment_loss

TESTS_09 = ["tests/test_adapters.py::test_forward_matches_reference_equation",
            "tests/test_align.py::test_alignment_gradient_on_rlora_reaches_its_A_only"]


def toy_mechanism(module="model.layers.1.mlp.gate_proj"):
    """The KL alignment loss on one R-LoRA module's A-output (tiny random Llama, rank 4, 3 heads, gate/up/down,
    dropout 0.1; one batch of 3 builtin tasks x 2 examples): z = A·x, the loss finite and positive, and of that
    module's tensors only A gets a gradient. Pinned by tests/test_adapters.py::test_forward_matches_reference_equation
    (case rlora: z is A x) and tests/test_align.py::test_alignment_gradient_on_rlora_reaches_its_A_only."""
    model, batches, _ = toy("rlora", dropout=0.1)
    b, m, seen = next(batches), model.get_submodule(module), {}
    hook = m.register_forward_pre_hook(lambda _, inputs: seen.update(x=inputs[0]))
    with adapter_context(model, collect=True) as ctx:
        model(b["input_ids"], b["attention_mask"])
    hook.remove()
    z = ctx.a_outputs[module]
    z_diff = (z - seen["x"] @ m.lora_A.weight.T).abs().max().item()
    loss = alignment_loss({module: z}, b["attention_mask"], b["task_ids"], kind="kl")
    loss.backward()
    grads = {k: 0.0 if p.grad is None else p.grad.norm().item()
             for k, p in (("A", m.lora_A.weight), ("B", m.lora_B.weight), ("router", m.lora_router.weight))}
    print(f"mechanism (tiny random Llama, R-LoRA r=4 x 3 heads, {module}, dropout 0.1, train mode):")
    print(f"  A-output z vs A·x from the module's input: max |diff| = {z_diff:g}; KL alignment loss on z = "
          f"{loss.item():.6f}")
    print(f"  backward of that loss alone: |grad A| = {grads['A']:.3e}, |grad B_i| = {grads['B']:g}, "
          f"|grad router| = {grads['router']:g}")
    print(f"  pinned by {TESTS_09[0]} (case rlora), {TESTS_09[1]}")
    return {"module": module, "z_vs_Ax_max_abs_diff": z_diff, "alignment_loss": loss.item(),
            "grad_norm": grads, "tests": TESTS_09}


mechanism_toy = toy_mechanism()

# %% [markdown]
# ## 1. Accuracy with and without the alignment loss, beside the base model and the majority label
# The alignment loss adds no parameters: each pair of rows has the same trainable count.

# %%
grids = claim_grids(args.tiny, args.rerun)
c = grids.read_or_stop("9")
print("\nsuite average accuracy, mean ± SE over seeds:\n")
print(accuracy_table(c, LABELS))
print("\nper task (%):\n")
print(task_table(c, LABELS))
align = {k: [r["curve"]["align_last5"] for r in c.runs.get(k) or []] for k in LABELS}
print("\nalignment loss of the last 5 training steps, per seed (0 without the loss): "
      + "; ".join(f"{name(k)} {', '.join(f'{v:.3g}' for v in vs)}" for k, vs in align.items() if vs))

# %% [markdown]
# ## 2. The claimed differences
# Claim 9: R-LoRA + align − R-LoRA and M-LoRA + align − M-LoRA are positive (the paper gives the direction, no
# numbers we could find). Intervals: the paired bootstrap over (seed, example), 95%.

# %%
print("\nclaimed differences (points):\n")
print(comparison_table(c))
# Printed above, from the cache: both intervals (bootstrap over (seed, example) and the seed-level t) and the
# verdict of each difference, beside the paper's; the README's claim-by-claim reading is generated the same way.

# %% [markdown]
# ## 3. The mechanism: does the loss pull the task clusters together when A feeds several heads?
# The probe of tutorial 06 (experiments.analysis.separation_probe): held-out prompts, each module's A-output averaged
# over an example's tokens, the between/within task separation averaged over modules, the within-task spread, and
# the KL alignment loss on those held-out A-outputs. Paired over seeds (t interval, 95%); the claimed direction is
# "alignment lowers separation".

# %%
probe = probe_table(c, LABELS)
mechanism = seed_pairs(c, [("rlora+align", "rlora"), ("mlora+align", "mlora")], sep_ratio, False)
print_paired(mechanism, "separation", "lower")
# Printed above, from the cache: the held-out separation with and without the loss, per architecture, and its
# paired difference over seeds.

# %% [markdown]
# ## Plot: accuracy, the paired differences, and the task separation of the A-outputs

# %%
def draw(plt):
    fig, ax = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1, 1.2, 0.8]})
    accuracy_panels(ax[0], ax[1], c, LABELS)
    value_bars(ax[2], {k: p["sep_ratio"] for k, p in probe.items()}, "held-out task separation of A-outputs (± SE)",
               "between / within task distance", lambda k: "salmon" if k.endswith("+align") else "lightsteelblue")
    fig.suptitle(f"09 alignment on multi-head adapters (KL, λ = 0.1 in the paper's units): {suite_text(c)}",
                 fontsize=8)
    fig.tight_layout()
    return fig


finish(args, "09_align_any_architecture", {"mechanism": mechanism_toy, "claims": {"9": c.to_json()}, "probe": probe,
                                           "separation": mechanism}, draw)
