"""Tutorial 09 — claim 9: "alignment is architecture-agnostic" (METHODS.md §7 claim 9, §3).

Align-LoRA's appendix (Table 9, values not found; METHODS §8) adds its alignment loss to the multi-head adapters it
argues against, R-LoRA and M-LoRA, and reports that they improve too: the loss acts on the shared A's output,
which every member of the family has, so it should not care what sits after A.

This reads grid "9" of experiments/claims.py: R-LoRA and M-LoRA (rank 4, 3 heads, gate/up/down) with and without
the KL loss at the paper's λ = 0.1 (`train.py --align-any`) on A x, before the per-head dropout (METHODS §3.1), and
tutorial 06's separation probe on each run.
"""

# %% [setup]
from common import claim_grids, finish, parse_args, pinned, toy

from experiments.reports import accuracy_panels, accuracy_table, comparison_table, name, print_paired, probe_table, \
    seed_pairs, sep_ratio, show, suite_text, task_table, value_bars
from nanoalign.adapters import adapter_context
from nanoalign.align import alignment_loss

args = parse_args(__doc__, ["9"])
LABELS = ["rlora", "rlora+align", "mlora", "mlora+align"]

# %% [markdown]
# ## 0. The mechanism on a toy, in seconds: the loss on R-LoRA's shared A
# On the toy (dropout 0.1, train mode): z against A·x from the module's input, and one module's loss alone reaches
# its A, not its heads B_i nor its router (upstream modules' B and routers do get it, as for LoRA).

# %%
def toy_mechanism(module="model.layers.1.mlp.gate_proj"):
    """The KL loss on one toy R-LoRA module's z = A·x: only its A gets a gradient."""
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
    return pinned({"module": module, "z_vs_Ax_max_abs_diff": z_diff, "alignment_loss": loss.item(), "grad_norm": grads},
                  "tests/test_adapters.py::test_forward_matches_reference_equation",  # its rlora case
                  "tests/test_align.py::test_alignment_gradient_on_rlora_reaches_its_A_only")


mechanism_toy = toy_mechanism()

# %% [markdown]
# ## 1. Accuracy with and without the alignment loss (which adds no parameters), beside base and majority; the
# claimed differences, + align − without, positive for both (the paper gives no numbers we found)

# %%
c = claim_grids(args.tiny, args.rerun).read_or_stop("9")
show("suite average accuracy, mean ± SE over seeds", accuracy_table(c, LABELS))
show("per task (%)", task_table(c, LABELS))
align = {k: [r["curve"]["align_last5"] for r in c.runs.get(k) or []] for k in LABELS}
print("\nalignment loss of the last 5 training steps, per seed (0 without the loss): "
      + "; ".join(f"{name(k)} {', '.join(f'{v:.3g}' for v in vs)}" for k, vs in align.items() if vs))
show("claimed differences (points)", comparison_table(c))

# %% 2. Does the loss pull the task clusters together when A feeds several heads? Tutorial 06's probe, paired
probe = probe_table(c, LABELS)
mechanism = seed_pairs(c, [("rlora+align", "rlora"), ("mlora+align", "mlora")], sep_ratio, False)
print_paired(mechanism, "separation", "lower")

# %% Plot: accuracy, the paired differences, and the task separation of the A-outputs
def draw(plt):
    fig, ax = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [1, 1.2, 0.8]})
    accuracy_panels(ax[0], ax[1], c, LABELS)
    value_bars(ax[2], {k: p["sep_ratio"] for k, p in probe.items()}, "held-out task separation of A-outputs (± SE)",
               "between / within task distance", lambda k: "salmon" if k.endswith("+align") else "lightsteelblue")
    return fig


finish(args, "09_align_any_architecture", {"mechanism": mechanism_toy, "claims": {"9": c.to_json()}, "probe": probe,
                                           "separation": mechanism}, draw,
       f"09 alignment on multi-head adapters (KL, λ = 0.1 in the paper's units): {suite_text(c)}")
