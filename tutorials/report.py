"""The README's "What the tutorials show": one row per claim (METHODS.md §7), generated from the claim grids of
experiments/claims.py (no number typed by hand), plus the per-task tables of claims 1 and 4 in the shape of the
paper's Table 1.

Each row: the paper's numbers (METHODS §6), ours, the paired differences with their 95% intervals, the verdict,
the budget; an unmeasured claim names the command that trains it. Claim 7 and claim 2's mechanism come from the
results JSON of tutorials 07 and 02, which measure them exactly.
"""

import argparse
import json
import sys
from pathlib import Path

from common import OUT, RESULTS, claim_grids

from experiments import claims as C
from experiments import paper
from experiments.reports import head_cosine, interval, markdown, name, pm, seed_paired, sep_ratio, suite_text, \
    task_table, verdict_text, vs_base_words
from experiments.stats import TILT_FLAG, mean_se, tilt
from nanoalign.plumbing.system import write_atomic

README = Path(__file__).resolve().parents[1] / "README.md"
CLAIM_GRIDS = ("1-2", "3", "4-5", "6", "8", "9", "10")
HEADER = ["claim (tutorial)", "paper (METHODS §6)", "ours: mean ± SE over seeds",
          "paired difference: bootstrap [95%] t [95%]", "verdict", "threshold-free difference (AUROC on SST-2)",
          "suite, budget, seeds"]
T1, T5, R4 = ({k: v["Avg"] for k, v in paper.TABLE1.items()}, paper.TABLE5_3B, paper.RLORA_TABLE4)

# (row title, grid, methods shown, claimed pairs (A, B), the paper's numbers)
ROWS = [
    ("1. simplified multi-head (M-LoRA) ≥ R-LoRA, HydraLoRA [04]", "1-2", ["mlora", "rlora", "hydra"],
     [("mlora", "rlora"), ("mlora", "hydra")],
     f"M-LoRA {T1['mlora']}, R-LoRA {T1['rlora']}, HydraLoRA {T1['hydra']} (Table 1, Qwen2.5-3B, 5 tasks)"),
    ("2. removing the router alone does not help [02, 03, 04]", "1-2", ["hydra-norouter", "hydra"],
     [("hydra-norouter", "hydra")], f"w/o Router {T1['hydra-norouter']} vs {T1['hydra']} (Table 1)"),
    ("3. a LoRA at the multi-head budget matches it [05]", "3", ["lora-budget", "hydra", "rlora"],
     [("lora-budget", "hydra"), ("lora-budget", "rlora")],
     f"LoRA¹⁰ {paper.TABLE3_7B['lora-budget']}, HydraLoRA {paper.TABLE3_7B['hydra']}, R-LoRA "
     f"{paper.TABLE3_7B['rlora']} (Table 3, Qwen2.5-7B BBH)"),
    ("4. KL alignment (A-LoRA-K) beats LoRA [06]", "4-5", ["a-lora-k", "lora-r8"], [("a-lora-k", "lora-r8")],
     f"A-LoRA-K {T5['a-lora-k']} vs LoRA {T5['lora-r8']} (Table 5, Qwen2.5-3B, 8 tasks)"),
    ("5. MMD alignment does not match KL [06]", "4-5", ["a-lora-k", "a-lora-m"], [("a-lora-k", "a-lora-m")],
     f"A-LoRA-K {T5['a-lora-k']} vs A-LoRA-M {T5['a-lora-m']} (Table 5)"),
    ("6. A-LoRA-K ≥ LoRA at every λ ∈ [0.01, 0.5] (paper's units) [06]", "6", ["lora-r8", *paper.SWEEP],
     [(k, "lora-r8") for k in paper.SWEEP],
     f"A-LoRA-K {paper.FIGURE3['a-lora-k'][0]}-{paper.FIGURE3['a-lora-k'][1]} at every λ, LoRA "
     f"{paper.FIGURE3['lora']} (Figure 3)"),
    ("8. R-LoRA's multi-head dropout (+MT) and random init (+Init) each add points [08]", "8",
     ["hydra-rs", "hydra+mt", "hydra+init", "rlora"], [("hydra+mt", "hydra-rs"), ("hydra+init", "hydra-rs"),
                                                      ("rlora", "hydra-rs")],
     f"HydraLoRA {R4['hydra-rs']}, +MT {R4['hydra+mt']}, +Init {R4['hydra+init']}, both {R4['rlora']} (R-LoRA Table 4, "
     f"Qwen2.5-0.5B)"),
    ("9. alignment also helps R-LoRA / M-LoRA [09]", "9", ["rlora", "rlora+align", "mlora", "mlora+align"],
     [("rlora+align", "rlora"), ("mlora+align", "mlora")], "improves both (appendix Table 9; no numbers reachable)"),
    ("10. MeTA-LoRA on K examples per task beats LoRA on the same K and closes the gap to LoRA on all the data [10]",
     "10", [label for k in sorted(C.SHOTS) for label in (f"meta-k{k}", f"lora-k{k}")] + ["lora-r8"],
     [(f"meta-k{k}", b) for k in sorted(C.SHOTS) for b in (f"lora-k{k}", "lora-r8")],
     "abstract: with a few samples per task, matches or beats multi-task LoRA on the full data (no numbers "
     "reachable, METHODS §2.9)"),
]


def not_measured(title, claim, paper_text):
    return [title, paper_text, "not measured yet", "–", "–", "–",
            f"train: `python experiments/claims.py run --only {claim}`"]


def base_text(c):
    parts = []
    if c.report["base"]:
        parts.append(f"base {c.report['base']['average']:.1f}")
    if c.majority():
        parts.append(f"majority {c.majority()['average']:.1f}")
    return f" ({', '.join(parts)})" if parts else ""


def seeds_text(c, labels):
    n = sorted({len(c.row(k)["seeds"]) for k in labels if c.row(k)})
    return "no runs" if not n else f"{n[0]} seeds" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds per method"


def claim_row(title, claim, c, labels, pairs, paper_text):
    """One claim's row: means, the claimed pairs' intervals and verdicts, and a warning for a method not clearly
    above the base model (its row does not test the claim at this budget)."""
    if c is None or not any(c.row(k) for k in labels):
        return not_measured(title, claim, paper_text)
    ours = "; ".join(f"{name(k)} {pm(c.row(k)['average'], c.row(k)['se'])}" if c.row(k) else f"{name(k)} not run"
                     for k in labels) + base_text(c)
    collapsed = [f"{name(k)} {t} {s['collapsed']}/{s['seeds']}" for k in labels for t, s in c.per_task(k).items()
                 if s["collapsed"]]
    if collapsed:
        ours += "; collapsed (one prediction > 90%, in k/n seeds): " + ", ".join(collapsed)
    found = [(a, b, c.comparison(a, b)) for a, b in pairs]
    diff = "; ".join(f"{name(a)} − {name(b)} {interval(x)}" if x else f"{name(a)} − {name(b)}: not run"
                     for a, b, x in found)
    verdict = verdicts(found)
    weak = [name(k) for k in labels if c.row(k) and vs_base_words(c.row(k)) != "above base"]
    if weak:
        verdict += f"; NOT above base: {', '.join(weak)} (not a claim test at this budget)"
    tilted = [f"{name(k)} {t} {d['tilted_seeds']}/{d['seeds']}" for k in labels if c.row(k)
              for t, d in c.row(k).get("diagnostics", {}).items() if d["tilted_seeds"]]
    tf = "; ".join(f"{interval(x['threshold_free'])}: {verdict_text(x['threshold_free'])}" for a, b, x in found
                   if x and "threshold_free" in x)
    if tilted:
        tf += f"; tilted > {100 * TILT_FLAG:.0f} pts (k/n seeds): " + ", ".join(tilted)
    return [title, paper_text, ours, diff, verdict or "–", tf or "–", budget_text(c, labels)]


def verdicts(found):
    """'verdict' for one pair, 'A − B: verdict; ...' for several."""
    found = [(a, b, x) for a, b, x in found if x]
    if len(found) == 1:
        return verdict_text(found[0][2])
    return "; ".join(f"{name(a)} − {name(b)}: {verdict_text(x)}" for a, b, x in found)


def budget_text(c, labels):
    """The row's budget, seeds and missing runs (the suite is named once above the table)."""
    s = c.report["suite"]
    return (f"{s['steps']} steps x {s['batch_per_task']} per task, {s['test_per_task'] or 'all'} test per task; "
            f"{seeds_text(c, labels)}" + (f"; {len(c.missing)} runs missing" if c.missing else ""))


def seed_row(title, claim, c, labels, pairs, value, what, paper_text, expect_positive):
    """A per-run analysis's row (head cosine, separation): means ± SE and differences paired over seeds."""
    vals = {k: v for k in labels if (v := c.values(k, value))} if c else {}
    if not vals:
        return not_measured(title, claim, paper_text)
    ours = f"{what}: " + "; ".join(f"{name(k)} {pm(*mean_se(list(v.values())), 3)}" for k, v in vals.items())
    found = [(a, b, seed_paired(c, a, b, value, expect_positive)) for a, b in pairs]
    diff = "; ".join(f"{name(a)} − {name(b)} {interval(x, 3)}" for a, b, x in found if x) or "–"
    return [title, paper_text, ours, diff + " (t interval over seeds only)", verdicts(found) or "–", "–",
            budget_text(c, labels)]


def sweep_row(title, claim, c, labels, pairs, paper_text):
    """Claim 6's row: as claim_row, with the verdict counted over the λ values."""
    row = claim_row(title, claim, c, labels, pairs, paper_text)
    if row[2] == "not measured yet":
        return row
    verdicts = [x["verdict"] for a, b in pairs if (x := c.comparison(a, b))]
    row[4] = (f"above LoRA at {verdicts.count('reproduced')} of {len(pairs)} λ, below at "
              f"{verdicts.count('contradicted')}, borderline at {verdicts.count('borderline')}, not resolved at "
              f"{len(verdicts) - sum(map(verdicts.count, ('reproduced', 'contradicted', 'borderline')))}"
              + (f", not run at {len(pairs) - len(verdicts)}" if len(verdicts) < len(pairs) else "")
              + (row[4][row[4].index("; NOT above"):] if "; NOT above" in row[4] else ""))
    return row


def load(results, stem):
    path = Path(results) / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def mechanism_rows(results):
    """Claim 2's exact mechanism (tutorial 02) and claim 7 (tutorial 07), from their committed results JSON."""
    rows = []
    r02, r07 = load(results, "02_multi_head_family"), load(results, "07_cost")
    if r02:
        nr = r02["real_model"]["adapters"]["hydra-norouter"]
        rows.append(["2. (mechanism) HydraLoRA w/o Router is one rank-r LoRA [02]", "derived (METHODS §2.4)",
                     f"heads bit-identical after {r02['real_model']['steps']} steps (max abs B_i − B_j "
                     f"{nr['max_abs_head_difference']:.1f})", "–", "reproduced (exact)",
                     f"{r02['model']}, tutorial 02"])
    else:
        rows.append(["2. (mechanism) HydraLoRA w/o Router is one rank-r LoRA [02]", "derived (METHODS §2.4)",
                     "not measured yet", "–", "–", "run `python tutorials/02_multi_head_family.py`"])
    if r07:
        a = r07["adapters"]
        merged = ", ".join(f"{k} {a[k]['merge_max_abs_logit_diff']:.0e}" for k in a if a[k]["mergeable"])
        refuse = ", ".join(k for k in a if not a[k]["mergeable"])
        step = ", ".join(f"{k} {r07['summary'][k]['step_vs_lora']:.2f}x" for k in a)
        rows.append(["7. LoRA, Align-LoRA, M-LoRA, MultiLoRA merge exactly; routers do not [02, 07]",
                     "derived (METHODS §7)", f"merged vs unmerged max abs logit diff: {merged}; refuse to merge: "
                     f"{refuse}; train step vs LoRA: {step}", "–", "reproduced (exact)", "tutorial 07"])
    else:
        rows.append(["7. merge and cost [07]", "derived (METHODS §7)", "not measured yet", "–", "–",
                     "run `python tutorials/07_cost.py`"])
    return rows


def rows(grids, results=RESULTS):
    """The table's rows, and the Claim objects read (None where not measured)."""
    read = {k: grids.read(k) for k in CLAIM_GRIDS}
    out = []
    for title, claim, labels, pairs, paper_text in ROWS:
        c = read[claim]
        out.append((sweep_row if claim == "6" else claim_row)(title, claim, c, labels, pairs, paper_text))
        if title.startswith("1."):
            out.append(seed_row("1. (heads) the heads end up alike, M-LoRA's the most [03]", claim, c,
                                ["mlora", "rlora", "hydra"], [("mlora", "rlora"), ("mlora", "hydra")],
                                head_cosine, "mean inter-head cosine of B",
                                "HydraLoRA 0.76-0.80 per module; M-LoRA highest, median > 0.85 (Figure 2)", True))
        if title.startswith("2."):
            out.extend(r[:5] + ["–"] + r[5:] for r in mechanism_rows(results))  # exact: no threshold-free column
        if title.startswith("5."):
            out.append(seed_row("mechanism: alignment pulls the tasks' A-output clusters together [06]", claim, c,
                                ["a-lora-k", "a-lora-m", "lora-r8"], [("a-lora-k", "lora-r8"), ("a-lora-m", "lora-r8")],
                                sep_ratio, "held-out between/within task separation", "clusters closer, not collapsed "
                                "(appendix I.1)", False))
    return out, read


def compute_text(read):
    """Distinct runs (shared runs once), their wall time, commits, machines."""
    runs = {r["key"]: r for c in read.values() if c for rs in c.runs.values() for r in rs}
    if not runs:
        return "No grid runs cached yet."
    hosts = sorted({(r["machine"]["host"], r["machine"]["cpu_count"], r["machine"]["cuda"]) for r in runs.values()},
                   key=str)
    commits = sorted({str(r["machine"]["commit"]) for r in runs.values()})
    wall = sum(r["wall_s"] for r in runs.values())
    return (f"{len(runs)} distinct runs, {wall / 3600:.1f} h ({wall / 60:.0f} min) of wall time "
            f"(training + scoring; base-model evaluations not counted), commits {', '.join(commits)}; machines: "
            + "; ".join(f"{h} ({n} CPUs{', ' + cuda if cuda else ''})" for h, n, cuda in hosts))


# control row -> (the row it stands in for, what it changes): claims 1, 2 and 8's step-size and init controls
CONTROLS = {"mlora-mean": ("mlora", "step size: heads averaged, not summed"),
            "hydra-norouter-mean": ("hydra-norouter", "step size: heads averaged, not summed"),
            "mlora-cf": ("mlora", "init: the released code's"), "rlora-cf": ("rlora", "init: the released code's"),
            "hydra+init-cf": ("hydra+init", "init: the released code's")}


def comparison_text(x):
    """'A − B +0.47 [−0.77, +1.84] t [−0.9, +1.9]: verdict; threshold-free ...: verdict' of one comparison."""
    out = f"{name(x['a'])} − {name(x['b'])} {interval(x)} ({x['seeds']} seeds): **{verdict_text(x)}**"
    tf = x.get("threshold_free")
    if tf:
        out += f" (threshold-free {interval(tf)}: {verdict_text(tf)})"
    return out


def reading(claim, c):
    """One claim's comparisons in words, each control beside the comparison it repeats: does the verdict hold?"""
    lines, by_pair = [], {(x["a"], x["b"]): x for x in c.report["comparisons"]}
    for x in c.report["comparisons"]:
        a, b = CONTROLS.get(x["a"], (x["a"],))[0], CONTROLS.get(x["b"], (x["b"],))[0]
        if (a, b) == (x["a"], x["b"]):
            lines.append(comparison_text(x))
            continue
        what = CONTROLS.get(x["a"], CONTROLS.get(x["b"]))[1]
        orig = by_pair.get((a, b))
        same = orig is not None and orig["verdict"] == x["verdict"]
        lines.append(f"control ({what}): {comparison_text(x)}; " + (
            "the original pair is not measured" if orig is None else
            "the verdict holds" if same else f"the verdict differs (the original's: {verdict_text(orig)}"
            + (f", over {orig['seeds']} seeds)" if orig["seeds"] != x["seeds"] else ")")))
    return lines


def spread_text(read):
    """How far the trained runs are above the base model and the majority rate, the lowest run, collapses, tilts."""
    runs = {r["key"]: r for c in read.values() if c for rs in c.runs.values() for r in rs}
    bases = [c for c in read.values() if c and c.base and c.majority()]
    if not runs or not bases:
        return None
    base, maj = 100 * bases[0].base["average"], bases[0].majority()["average"]
    avgs = sorted((100 * r["average"], r["label"], r["seed"]) for r in runs.values())
    coll = sum(any(v["collapsed"] for v in r["tasks"].values()) for r in runs.values())
    tilted = {}
    for r in runs.values():
        for t, v in r["tasks"].items():
            tilted.setdefault(t, 0)
            tilted[t] += tilt(v["predicted"], v["gold"]) > TILT_FLAG
    return (f"{len(runs)} trained runs: suite averages {avgs[0][0]:.1f}-{avgs[-1][0]:.1f}% (lowest: {name(avgs[0][1])} "
            f"seed {avgs[0][2]}), against the base model's {base:.1f}% and the majority rate's {maj:.1f}%; "
            f"{coll} run(s) with a task collapsed (one answer > 90%); tilted past {100 * TILT_FLAG:.0f} points: "
            + ", ".join(f"{t} in {n} of {len(runs)}" for t, n in sorted(tilted.items())) + ".")


def plain_reading(read):
    """The claims in words, every number from the cache (reading() per claim)."""
    parts = ["What the grids say, claim by claim (generated with the table):", ""]
    if (sp := spread_text(read)):
        parts.append(f"- **The budget**: {sp}")
    for claim in CLAIM_GRIDS:
        c = read[claim]
        if c is None or not c.report["comparisons"]:
            continue
        seeds = sorted({x["seeds"] for x in c.report["comparisons"]})
        parts.append(f"- **Claim {claim}** ({'-'.join(map(str, (seeds[0], seeds[-1]))) if len(seeds) > 1 else seeds[0]}"
                     " seeds): " + "; ".join(reading(claim, c)) + ".")
        if claim == "1-2":
            heads = {k: mean_se(list(v.values())) for k in ("hydra", "rlora", "mlora", *CONTROLS)
                     if (v := c.values(k, head_cosine))}
            parts.append("  Mean inter-head cosine of B: " + ", ".join(f"{name(k)} {pm(*v, 3)}"
                                                                       for k, v in heads.items()) + ".")
    return "\n".join(parts)


def render(grids, results=RESULTS):
    table, read = rows(grids, results)
    suites = sorted({suite_text(c).rsplit(";", 1)[0] for c in read.values() if c})
    parts = [("Suite: " + " | ".join(suites) + "." if suites else "Suite: not set yet (experiments/claims.py SUITE).")
             + " Means ± SE are over seeds; differences are paired over the seeds both methods have, each with two "
             "95% intervals (experiments/stats.py): the bootstrap over (seed, example) and the seed-level t interval "
             "(df = seeds − 1). A verdict is 'reproduced' or 'contradicted' only when both intervals exclude 0 on "
             "the same side, 'borderline' when one does and the other does not. The threshold-free column scores "
             "SST-2 (two options) by the AUROC of its option-score margin instead of accuracy, so a shifted decision "
             "threshold does not count; 'tilted': a task whose predicted-label shares are more than "
             f"{100 * TILT_FLAG:.0f} points from the gold shares. Generated by `python tutorials/report.py` from "
             "experiments/results/runs/.",
             markdown(HEADER, table)]
    c = read["1-2"]
    if c and c.report["methods"]:
        parts.append("Claims 1-2 per task, ours (mean ± SE over seeds; (c k/n): collapsed in k of n seeds) / the "
                     "paper's Table 1 cell where the task is one of its columns:\n\n"
                     + task_table(c, ["hydra", "hydra-norouter", "rlora", "mlora"], paper.TABLE1,
                                  paper.TABLE1_COLUMN_OF))
    c = read["4-5"]
    if c and c.report["methods"]:
        parts.append("Claims 4-5 per task, ours / the paper's Table 5 average (its per-task cells are not in "
                     "METHODS §6.2):\n\n" + task_table(c, ["lora-r8", "a-lora-k", "a-lora-m"],
                                                       {k: {"Avg": paper.TABLE5_3B[k]} for k in paper.TABLE5_3B}))
    parts.append(plain_reading(read))
    parts.append("Compute: " + compute_text(read))
    return "\n\n".join(parts) + "\n", table


# README.md's generated block sits between these two lines; the prose around them is written by hand from it
BEGIN = "<!-- generated by tutorials/report.py --readme: begin -->"
END = "<!-- generated by tutorials/report.py --readme: end -->"


def replace_block(text, block):
    """`text` with what lies between BEGIN and END replaced by `block` (a ValueError if the markers are missing)."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"no '{BEGIN}' ... '{END}' block in the README: add the two lines where the table goes")
    return text[:i + len(BEGIN)] + "\n\n" + block.strip("\n") + "\n\n" + text[j:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke test: a tiny grid of every claim, trained + rendered")
    p.add_argument("--results", default=str(RESULTS), help="where tutorials 02 and 07 wrote their JSON (default: the "
                   f"committed %(default)s; your own runs: {OUT})")
    p.add_argument("--readme", nargs="?", const=str(README), default=None, metavar="PATH",
                   help=f"also write the table into PATH (default {README.name}) between its report markers")
    args = p.parse_args(argv)
    text, _ = render(claim_grids(args.tiny, stream=sys.stderr), args.results)
    print(text, end="")
    if args.readme:
        path = Path(args.readme)
        try:
            new = replace_block(path.read_text(encoding="utf-8"), text)
        except (OSError, ValueError) as e:
            sys.exit(f"report.py: cannot update {path}: {e}")
        write_atomic(path, new)
        print(f"wrote the table into {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
