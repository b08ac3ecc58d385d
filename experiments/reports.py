"""Reading the claim grids of experiments/claims.py (METHODS §7) and rendering them for tutorials 03-06 and 08-10 and
as the README's table (`render`, printed by tutorials/report.py). `Grids.read` reads a claim's cached runs (no prepared
data needed) into a `Claim` with claims.claim_report's statistics, saying which runs are missing."""

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments import claims as C
from experiments import paper
from experiments.stats import TILT_FLAG, mean_se, t_interval, tilt, verdict
from nanoalign.plumbing.tasks import TASK_SUITE

CURVE = ("ce_first5", "ce_last5", "align_last5")  # the training-curve summary kept in the tutorials' JSON
NAMES = {"hydra": "HydraLoRA", "hydra-norouter": "HydraLoRA w/o Router", "rlora": "R-LoRA", "mlora": "M-LoRA",
         "lora-r8": "LoRA r=8", "a-lora-k": "A-LoRA-K", "a-lora-m": "A-LoRA-M", "lora-budget": "matched LoRA",
         "rlora+align": "R-LoRA + align", "mlora+align": "M-LoRA + align", "hydra-rs": "HydraLoRA (α/√r)",
         "hydra+mt": "HydraLoRA +MT", "hydra+init": "HydraLoRA +Init", "a-lora-k-l0.01": "A-LoRA-K λ=0.01",
         "a-lora-k-l0.05": "A-LoRA-K λ=0.05", "a-lora-k-l0.5": "A-LoRA-K λ=0.5", "mlora-mean": "M-LoRA (heads mean)",
         "hydra-norouter-mean": "HydraLoRA w/o Router (heads mean)", "rlora-cf": "R-LoRA (code init)",
         "mlora-cf": "M-LoRA (code init)", "hydra+init-cf": "HydraLoRA +Init (code init)"}
NAMES.update({f"{kind}-k{k}": f"{what} K={k}" for k in C.SHOTS  # claim 10: K examples per task
              for kind, what in (("meta", "MeTA-LoRA"), ("lora", "LoRA"))})
NAMES.update({f"meta-k16-a{a}": f"MeTA-LoRA K=16 α={a}" for a in C.META_ALPHAS})  # grid 10-alpha
NAMES.update({k + C.OWN: f"{NAMES[k]} (own lr)" for k in C.LR_METHODS})  # grids 1-2@own, 4-5@own


# ----------------------------------------------------------------------------------------------- reading a claim

@dataclass
class Claim:
    """One claim's grid as read from the cache: claim_report's numbers, the raw runs and what is missing."""
    claim: str
    report: dict
    runs: dict        # {label: [run result of each cached seed]}
    base: dict        # the base model's evaluation, or None
    missing: list     # [(label, seed)] not cached yet
    seeds: list       # the grid's seeds
    labels: list      # the grid's methods, in the claim's order
    model_params: int
    tiny: bool = False
    damaged: tuple = ()  # result files found damaged and moved to runs/damaged/ (they count as missing)

    def row(self, label):
        return self.report["methods"].get(label)

    def comparison(self, a, b):
        return next((x for x in self.report["comparisons"] if (x["a"], x["b"]) == (a, b)), None)

    def tasks(self):
        return list(self.report["suite"]["tasks"])

    def majority(self):
        """{task: majority-class rate (%)} of the test set (the same for every run), and its mean over tasks."""
        src = self.base or next((rs[0] for rs in self.runs.values() if rs), None)
        if src is None:
            return None
        m = {t: 100 * v["majority_rate"] for t, v in src["tasks"].items()}
        return {**m, "average": sum(m.values()) / len(m)}

    def per_task(self, label):
        """{task: {"mean", "se", "collapsed": seeds where one prediction > 90%, "seeds"}} over the method's seeds."""
        runs = self.runs.get(label) or []
        acc = {t: mean_se([100 * r["tasks"][t]["accuracy"] for r in runs]) for t in (runs[0]["tasks"] if runs else {})}
        return {t: {"mean": m, "se": se, "collapsed": sum(r["tasks"][t]["collapsed"] for r in runs), "seeds": len(runs)}
                for t, (m, se) in acc.items()}

    def values(self, label, fn):
        return {r["seed"]: v for r in self.runs.get(label) or [] if (v := fn(r)) is not None}

    def base_collapsed(self):
        return sorted(t for t, v in self.base["tasks"].items() if v["collapsed"]) if self.base else []

    def to_json(self):
        return {"claim": self.claim, "report": self.report, "missing": [list(m) for m in self.missing],
                "seeds": self.seeds, "labels": self.labels, "majority": self.majority(),
                "per_task": {k: self.per_task(k) for k in self.labels if self.runs.get(k)},
                "curves": {k: [{"seed": r["seed"], **{x: r["curve"][x] for x in CURVE}} for r in rs]
                           for k, rs in self.runs.items() if rs},
                "base_collapsed": self.base_collapsed(), "model_params": self.model_params}


class Grids:
    """Where the claim grids are (`where`: claims.grid's arguments); `read` trains what is missing if `train`."""

    def __init__(self, where=None, train=False, tiny=False, stream=None):
        self.where = where or {}
        self.suite = self.where.get("suite") or C.SUITE
        self.train, self.tiny = train, tiny
        self.stream = stream  # where notices and training logs go (None: stdout); report.py keeps stdout for markdown

    def read(self, claim, script=None):
        """The claim's Claim, or None (with a message saying why and what to run) when nothing can be read."""
        run_cmd = f"python experiments/claims.py run --only {claim}"
        with contextlib.redirect_stdout(self.stream or sys.stdout):
            if self.suite is None:
                print(f"claim {claim}: NOT MEASURED YET. experiments/claims.py has no SUITE: the task screening "
                      f"(experiments/screening.py) picks the suite and budget. Once SUITE is set, train this grid "
                      f"with\n    {run_cmd}" + (f"\nor `python tutorials/{script} --rerun`" if script else ""))
                return None
            g = C.grid(claim, **self.where)
            if self.train:
                g.run()
            res = g.results()
            base = res.pop("base")
            claim_ = Claim(claim, C.claim_report(claim, g), res, base, g.missing(), list(g.seeds), list(g.methods),
                           model_params(g.suite.model), self.tiny, tuple(g.damaged))
            report_missing(claim_, run_cmd, script)
        return claim_

    def has_dev(self):
        """Can the suite have a dev split (the lr grid and the "@own" rows need one)? Builtin tasks have none."""
        return all(TASK_SUITE.get(t) != "builtin" for t in self.suite.tasks)

    def read_or_stop(self, claim):
        """`read` for the running tutorial, printing the suite; exit 0 (after read's message) with nothing to read."""
        c = self.read(claim, script=Path(sys.argv[0]).name)
        if c is None:
            raise SystemExit(0)
        print(f"\nsuite: {suite_text(c)}")
        return c


def model_params(model):
    """Parameters of the base model (meta device: no weights read), for the trainable share in %."""
    import torch
    from nanoalign.model import CausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in CausalLM(C.model_config(model)).parameters())


def report_missing(c: Claim, run_cmd, script):
    """Say exactly which runs of the grid are not cached, and how to train them; warn about unequal seed sets."""
    total = len(c.labels) * len(c.seeds)
    if c.missing or c.base is None:
        by = {k: [s for label, s in c.missing if label == k] for k, _ in c.missing}
        parts = ([f"{k} (seed{'s' * (len(v) > 1)} {', '.join(map(str, v))})" for k, v in by.items()]
                 + ["the base model's evaluation"] * (c.base is None)
                 + [f"damaged and moved aside: {', '.join(c.damaged)}"] * bool(c.damaged))
        print(f"claim {c.claim}: {total - len(c.missing)} of {total} runs cached; MISSING: {'; '.join(parts)}.\n"
              f"  Train them with `{run_cmd}`" + (f" or `python tutorials/{script} --rerun`" if script else "")
              + ". Below: what is cached.")
    seed_sets = {k: tuple(r["seed"] for r in rs) for k, rs in c.runs.items() if rs}
    if len(set(seed_sets.values())) > 1:
        print(f"claim {c.claim}: the methods have different seed sets ("
              + ", ".join(f"{k}: {len(v)}" for k, v in seed_sets.items()) + "): each mean ± SE is over that method's "
              "own seeds; every paired difference uses only the seeds both methods have.")


# ----------------------------------------------------------------------------------------------- statistics

def seed_paired(c: Claim, a, b, fn, expect_positive, scale=1.0):
    """fn(run_a) − fn(run_b) paired over common seeds: mean, SE, 95% t interval, verdict. For per-run analyses
    (head cosine, separation ratio), where the seed is the only noise."""
    va, vb = c.values(a, fn), c.values(b, fn)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return None
    d = [scale * (va[s] - vb[s]) for s in seeds]
    m, low, high = t_interval(d)
    return {"a": a, "b": b, "seeds": len(seeds), "diff": m, "se": mean_se(d)[1], "per_seed": d, "low": low,
            "high": high, "verdict": "one seed: no interval" if low is None
            else verdict(low, high, expect_positive, identical=all(x == 0 for x in d))}


def seed_pairs(c: Claim, pairs, fn, expect_positive):
    return [x for a, b in pairs if (x := seed_paired(c, a, b, fn, expect_positive))]


def print_paired(items, what, claimed):
    """One line per seed-paired difference: its interval, seeds and verdict, and the claimed direction."""
    for x in items:
        print(f"  {what}, {minus(x)}: {interval(x, 3)} over {x['seeds']} seeds -> {x['verdict']} (claimed: {claimed})")


def sep_ratio(run):
    return run["analysis"].get("probe", {}).get("sep_ratio")


def head_cosine(run):
    return run["analysis"].get("head_cosine_mean")


def vs_base_words(row):
    """Is a trained method above the untrained base model on the suite average (paired over seed and example)?"""
    v = row.get("vs_base")
    return "base not evaluated" if v is None else {
        "reproduced": "above base", "contradicted": "BELOW base", "no difference": "= base",
        "borderline": "borderline"}.get(v["verdict"], "not resolved")


# ----------------------------------------------------------------------------------------------- formatting

def name(label):
    return NAMES.get(label, label)


def minus(x, b=None):
    """'A − B' of a comparison `x` (or of the labels x, b), in the readers' names."""
    a, b = (x["a"], x["b"]) if b is None else (x, b)
    return f"{name(a)} − {name(b)}"


def pm(mean, se, digits=1):
    """'62.6 ± 0.8', or '62.6 (1 seed)' where the SE is unknown (stats.mean_se of one value is NaN)."""
    return f"{mean:.{digits}f} (1 seed)" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def bar(se):
    return 0.0 if math.isnan(se) else se


def interval(x, digits=2):
    """'+0.78 [−0.40, +1.90] t [−0.55, +2.11]' (bootstrap, then the t interval where there is one)."""
    if x.get("low") is None:
        return f"{x['diff']:+.{digits}f} (no interval)"
    t = f" t [{x['t_low']:+.{digits}f}, {x['t_high']:+.{digits}f}]" if x.get("t_low") is not None else ""
    return f"{x['diff']:+.{digits}f} [{x['low']:+.{digits}f}, {x['high']:+.{digits}f}]{t}"


def verdict_text(x):
    """The combined verdict, and where it is borderline which interval resolves it."""
    v = x["verdict"]
    return f"borderline (bootstrap: {x['verdict_boot']}; t: {x['verdict_t']})" if v == "borderline" else v


def show(title, table):
    """Print a table (or a line) under its title, a blank line before and after the title."""
    print(f"\n{title}:\n\n{table}")


def replace_block(text, block, begin, end):
    """`text` with what lies between the lines `begin` and `end` replaced by `block` (a ValueError if they are
    missing: a generated block never guesses where it goes)."""
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no '{begin}' ... '{end}' block in the README: add the two lines where the table goes")
    return text[:i + len(begin)] + "\n\n" + block.strip("\n") + "\n\n" + text[j:]


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def accuracy_table(c: Claim, labels=None):
    """Per method: seeds, suite average, − base (95%), trainable, collapses, tilts; base and majority rows first."""
    rows = []
    if (b := c.report["base"]):
        rows.append(["base model (no training)", "–", f"{b['average']:.1f}", "–", "–", "0",
                     ", ".join(c.base_collapsed()) or "–"])
    if (maj := c.majority()):
        rows.append(["majority label of each task", "–", f"{maj['average']:.1f}", "–", "–", "–", "–"])
    for k in labels or c.labels:
        r = c.row(k)
        if r is None:
            rows.append([name(k), "0", "not run yet", "", "", "", ""])
            continue
        v = r.get("vs_base")
        coll = ", ".join(f"{t} ({n}/{s['seeds']})" for t, s in c.per_task(k).items() if (n := s["collapsed"]))
        rows.append([name(k), str(len(r["seeds"])), pm(r["average"], r["se"]),
                     pm(*r["threshold_free"]) if "threshold_free" in r else "–", interval(v) if v else "–",
                     vs_base_words(r), f"{r['trainable']:,} ({100 * r['trainable'] / c.model_params:.2f}%)",
                     coll or "–", tilt_text(r)])
    return markdown(["method", "seeds", "average (%) ± SE", "threshold-free average ± SE", "− base [95% CI]",
                     "vs base", "trainable", "collapsed in (seeds)", f"tilted > {100 * TILT_FLAG:.0f} pts in (seeds)"],
                    rows)


def tilt_text(row):
    """'sst2 (5/5, up to 35.4)': tasks whose predicted-label shares were off the gold shares past stats.TILT_FLAG."""
    d = row.get("diagnostics", {})
    return ", ".join(f"{t} ({v['tilted_seeds']}/{v['seeds']}, up to {v['tilt_max']:.1f})" for t, v in d.items()
                     if v["tilted_seeds"]) or "–"


def comparison_table(c: Claim):
    """Each claimed difference: ours (paired bootstrap over seed and example, 95%), the verdict, the paper's."""
    rows, tasks = [], []
    for x in c.report["comparisons"]:
        tf = x.get("threshold_free")
        rows.append([minus(x), interval(x), str(x["seeds"]), verdict_text(x),
                     f"{interval(tf)}: {verdict_text(tf)}" if tf else "–", paper_text(c.claim, x)])
        tasks += [[minus(x), t, interval(v), verdict_text(v)] for t, v in x["per_task"].items() if "verdict" in v]
    if not rows:
        return "(no comparison yet: a claimed pair needs both methods' runs)"
    return (markdown(["difference (points)", "ours: bootstrap [95%] t [95%]", "seeds", "verdict",
                      "threshold-free (AUROC on two-option tasks)", "paper"], rows)
            + "\n\nPer task:\n\n" + markdown(["difference (points)", "task", "bootstrap [95%] t [95%]", "verdict"],
                                             tasks))


def paper_text(claim, x):
    """The paper's numbers of one comparison, with its difference where claims.py's text does not give it."""
    pd = paper.paper_diff(claim, x["a"], x["b"])
    return x["paper"] + (f" ({pd:+.2f})" if pd is not None and f"{pd:+.2f}" not in x["paper"] else "")


def task_cell(s):
    return pm(s["mean"], s["se"]) + (f" (c {s['collapsed']}/{s['seeds']})" if s["collapsed"] else "")


def task_table(c: Claim, labels, paper_cells=None, column_of=None):
    """The paper's Table 1 shape: per method, per task mean ± SE ("(c k/n)": collapsed in k of n seeds), average and
    trainable share, with the paper's cell as "ours / paper" where a task is one of its columns (`column_of`)."""
    tasks, maj = c.tasks(), c.majority()
    paper_cells, column_of = paper_cells or {}, column_of or {}
    head = ["method", *[t + (f" / {column_of[t]}" if t in column_of else "") for t in tasks], "average", "trainable %"]
    rows = []
    if c.base:
        rows.append(["base model", *[f"{100 * c.base['tasks'][t]['accuracy']:.1f}"
                                     + (" (c)" if c.base["tasks"][t]["collapsed"] else "") for t in tasks],
                     f"{100 * c.base['average']:.1f}", "0"])
    if maj:
        rows.append(["majority label", *[f"{maj[t]:.1f}" for t in tasks], f"{maj['average']:.1f}", "–"])
    for k in labels:
        r, pt, pc = c.row(k), c.per_task(k), paper_cells.get(k, {})
        if r is None:
            rows.append([name(k), *["not run yet"] * len(tasks), "", ""])
            continue
        cells = [task_cell(pt[t]) + (f" / {pc[column_of[t]]:.2f}" if t in column_of and column_of[t] in pc else "")
                 for t in tasks]
        avg = pm(r["average"], r["se"]) + (f" / {pc['Avg']:.2f}" if "Avg" in pc else "")
        share = f"{100 * r['trainable'] / c.model_params:.2f}" + (f" / {pc['%Param']:.2f}" if "%Param" in pc else "")
        rows.append([name(k), *cells, avg, share])
    missing = [col for col in paper.TABLE1_COLUMNS if col not in {column_of.get(t) for t in tasks}]
    return markdown(head, rows) + (f"\n\nThe paper's columns not in our suite: {', '.join(missing)}; its averages are "
                                   f"over its own tasks, ours over ours." if column_of and missing else "")


PROBE = ("sep_ratio", "sep_within", "heldout_kl")


def probe_table(c: Claim, labels):
    """Print the separation probe of each method (mean ± SE over seeds); return {label: {key: (mean, SE)}}."""
    probe = {k: {key: mean_se([r["analysis"]["probe"][key] for r in runs]) for key in PROBE} for k in labels
             if (runs := [r for r in c.runs.get(k) or [] if "probe" in r["analysis"]])}
    show("held-out A-output probe (mean ± SE over seeds)",
         markdown(["method", "seeds", "separation (between/within)", "within-task spread", "held-out KL"],
                  [[name(k), str(len(c.values(k, sep_ratio))), *[pm(*p[key], 3) for key in PROBE]]
                   for k, p in probe.items()]) if probe else "(not measured yet)")
    return probe


def seeds_text(c: Claim, labels=None, per=""):
    """'5 seeds', or '3-5 seeds' + `per` where the methods (`labels`, default all) have different counts."""
    n = sorted({len(c.row(k)["seeds"]) for k in labels or c.report["methods"] if c.row(k)})
    return "no runs" if not n else f"{n[0]} seeds" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds{per}"


def suite_text(c: Claim):
    s = c.report["suite"]
    model = "the tiny random model" if c.tiny else s["model"]
    return (f"{model}, {len(s['tasks'])} tasks ({', '.join(s['tasks'])}), {s['fmt']} format scored by {s['mode']}"
            f", {s['steps']} steps x {s['batch_per_task']} per task, lr {s['lr']:g}, "
            f"{s['test_per_task'] or 'all'} test examples per task; {seeds_text(c)}")


# ----------------------------------------------------------------------------------------------- plots

def bars(ax, c: Claim, labels, title=""):
    """Suite average per method (bar: mean, error bar: SE, dots: seeds); base model dashed, majority dotted."""
    labels = [k for k in labels if c.row(k)]
    mean = [c.row(k)["average"] for k in labels]
    ax.bar(range(len(labels)), mean, yerr=[bar(c.row(k)["se"]) for k in labels], color="lightsteelblue", capsize=4)
    for i, k in enumerate(labels):
        ax.plot([i] * len(c.row(k)["per_seed"]), c.row(k)["per_seed"], "k.", ms=4)
    ys = [v for k in labels for v in c.row(k)["per_seed"]]
    for ref, ls, text in ((c.report["base"], "--", "base model"), (c.majority(), ":", "majority label")):
        if ref:
            ax.axhline(ref["average"], color="gray", ls=ls, lw=1, label=text)
            ys.append(ref["average"])
    ax.set_xticks(range(len(labels)), [name(k) for k in labels], rotation=20, fontsize=7, ha="right")
    if ys:
        ax.set_ylim(max(0, min(ys) - 3), min(100, max(ys) + 3))
    ax.set(ylabel="suite average accuracy (%)", title=title)
    ax.legend(fontsize=7)


def comparison_items(c: Claim):
    """[(text, comparison, the paper's difference or None)] of the claim's comparisons, for `diffs`."""
    return [(minus(x), x, paper.paper_diff(c.claim, x["a"], x["b"])) for x in c.report["comparisons"]]


def diffs(ax, items, title="paired differences, 95% CI"):
    """One horizontal interval per (text, comparison, paper's difference or None); the paper's as a red x."""
    labelled = False
    for i, (text, x, pd) in enumerate(items):
        if x.get("low") is not None:
            ax.errorbar(x["diff"], i, xerr=[[x["diff"] - x["low"]], [x["high"] - x["diff"]]], fmt="o", color="k",
                        capsize=4)
        else:
            ax.plot(x["diff"], i, "ko")
        if pd is not None:
            ax.plot(pd, i, "rx", ms=8, label=None if labelled else "paper")
            labelled = True
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(len(items)), [t for t, _, _ in items], fontsize=7)
    ax.set(title=title, xlabel="points")
    if any(pd is not None for _, _, pd in items):
        ax.legend(fontsize=7)


def accuracy_panels(ax_bars, ax_diffs, c: Claim, labels, title="paired differences, 95% CI"):
    """The two panels every accuracy claim has: `bars` of the methods, `diffs` of the claimed comparisons."""
    bars(ax_bars, c, labels, title="suite average (± SE over seeds)")
    if c.report["comparisons"]:
        diffs(ax_diffs, comparison_items(c), title)


def value_bars(ax, values, title, ylabel, color="lightsteelblue"):
    """One bar per method of a per-run analysis, {label: (mean, SE)}: mean with ± SE error bars."""
    shown = list(values)
    ax.bar(range(len(shown)), [values[k][0] for k in shown], yerr=[values[k][1] for k in shown], capsize=4,
           color=color if isinstance(color, str) else [color(k) for k in shown])
    ax.set_xticks(range(len(shown)), [name(k) for k in shown], rotation=20, fontsize=7, ha="right")
    ax.set(title=title, ylabel=ylabel)


# ----------------------------------------------------------------------------------------------- the README's table
# Per claim: the paper's numbers (METHODS §6), ours, the paired differences with their 95% intervals, the verdict,
# the budget, or the command that trains it; claim 7 and claim 2's mechanism from tutorials 07 and 02's JSON (exact).

TUTORIAL_RESULTS = Path(__file__).resolve().parents[1] / "tutorials" / "results"  # the committed tutorial JSON
CLAIM_GRIDS = ("1-2", "1-2@own", "3", "4-5", "4-5@own", "6", "8", "9", "10")
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
     ["hydra-rs", "hydra+mt", "hydra+init", "rlora"], [(k, "hydra-rs") for k in ("hydra+mt", "hydra+init", "rlora")],
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



def own_lr(row):
    """A claim's row again at each method's own learning rate, chosen on dev (claims.py's "@own" grids)."""
    title, grid, shown, pairs, text = row
    return (title.replace(" [", ", each method at its own dev-chosen lr [", 1), grid + C.OWN,
            [k + C.OWN for k in shown], [(a + C.OWN, b + C.OWN) for a, b in pairs], text)


ROWS = [r for row in ROWS for r in ((row, own_lr(row)) if row[1] in ("1-2", "4-5") else (row,))]


def not_measured(title, claim, paper_text):
    first = "lr` (each method's lr, chosen on dev), then `--only " * claim.endswith(C.OWN)
    return [title, paper_text, "not measured yet", "–", "–", "–",
            f"train: `python experiments/claims.py run --only {first}{claim}`"]


def base_text(c):
    """' (base 52.1, majority 48.0)': the base model's and the majority label's suite averages, where known."""
    parts = [f"{k} {v['average']:.1f}" for k, v in (("base", c.report["base"]), ("majority", c.majority())) if v]
    return f" ({', '.join(parts)})" if parts else ""


def claim_row(title, claim, c, labels, pairs, paper_text):
    """One claim's row: means, the claimed pairs' intervals and verdicts, and a warning for a method not clearly
    above the base model (its row does not test the claim at this budget)."""
    if c is None or not any(c.row(k) for k in labels):
        return not_measured(title, claim, paper_text)
    ours = "; ".join(f"{name(k)} {pm(c.row(k)['average'], c.row(k)['se'])}" if c.row(k) else f"{name(k)} not run"
                     for k in labels) + base_text(c)
    if (collapsed := [f"{name(k)} {t} {s['collapsed']}/{s['seeds']}" for k in labels
                      for t, s in c.per_task(k).items() if s["collapsed"]]):
        ours += "; collapsed (one prediction > 90%, in k/n seeds): " + ", ".join(collapsed)
    found = [(a, b, c.comparison(a, b)) for a, b in pairs]
    diff = "; ".join(f"{minus(a, b)} {interval(x)}" if x else f"{minus(a, b)}: not run" for a, b, x in found)
    verdict = verdicts(found)
    if (weak := [name(k) for k in labels if c.row(k) and vs_base_words(c.row(k)) != "above base"]):
        verdict += f"; NOT above base: {', '.join(weak)} (not a claim test at this budget)"
    tf = "; ".join(f"{interval(x['threshold_free'])}: {verdict_text(x['threshold_free'])}" for a, b, x in found
                   if x and "threshold_free" in x)
    if (tilted := [f"{name(k)} {t} {d['tilted_seeds']}/{d['seeds']}" for k in labels if c.row(k)
                   for t, d in c.row(k).get("diagnostics", {}).items() if d["tilted_seeds"]]):
        tf += f"; tilted > {100 * TILT_FLAG:.0f} pts (k/n seeds): " + ", ".join(tilted)
    return [title, paper_text, ours, diff, verdict or "–", tf or "–", budget_text(c, labels)]


def verdicts(found):
    """'verdict' for one pair, 'A − B: verdict; ...' for several."""
    found = [(a, b, x) for a, b, x in found if x]
    return (verdict_text(found[0][2]) if len(found) == 1
            else "; ".join(f"{minus(a, b)}: {verdict_text(x)}" for a, b, x in found))


def budget_text(c, labels):
    """The row's budget, seeds and missing runs (the suite is named once above the table)."""
    s = c.report["suite"]
    return (f"{s['steps']} steps x {s['batch_per_task']} per task, {s['test_per_task'] or 'all'} test per task; "
            f"{seeds_text(c, labels, ' per method')}" + (f"; {len(c.missing)} runs missing" if c.missing else ""))


def seed_row(title, claim, c, labels, pairs, value, what, paper_text, expect_positive):
    """A per-run analysis's row (head cosine, separation): means ± SE and differences paired over seeds."""
    vals = {k: v for k in labels if (v := c.values(k, value))} if c else {}
    if not vals:
        return not_measured(title, claim, paper_text)
    ours = f"{what}: " + "; ".join(f"{name(k)} {pm(*mean_se(list(v.values())), 3)}" for k, v in vals.items())
    found = [(a, b, seed_paired(c, a, b, value, expect_positive)) for a, b in pairs]
    diff = "; ".join(f"{minus(a, b)} {interval(x, 3)}" for a, b, x in found if x) or "–"
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
    r02, r07 = load(results, "02_multi_head_family"), load(results, "07_cost")
    rows = [["2. (mechanism) HydraLoRA w/o Router is one rank-r LoRA [02]", "derived (METHODS §2.4)",
             "not measured yet", "–", "–", "run `python tutorials/02_multi_head_family.py`"]]
    if r02:
        nr = r02["real_model"]["adapters"]["hydra-norouter"]
        rows[0][2:] = [f"heads bit-identical after {r02['real_model']['steps']} steps (max abs B_i − B_j "
                       f"{nr['max_abs_head_difference']:.1f})", "–", "reproduced (exact)",
                       f"{r02['model']}, tutorial 02"]
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


def rows(grids, results=TUTORIAL_RESULTS):
    """The table's rows, and the Claim objects read (None where not measured)."""
    read = {k: grids.read(k) for k in CLAIM_GRIDS if grids.has_dev() or not k.endswith(C.OWN)}
    out = []
    for title, claim, labels, pairs, paper_text in ROWS:
        if claim not in read:
            continue
        c = read[claim]
        out.append((sweep_row if claim == "6" else claim_row)(title, claim, c, labels, pairs, paper_text))
        if title.startswith("1.") and claim == "1-2":
            out.append(seed_row("1. (heads) the heads end up alike, M-LoRA's the most [03]", claim, c,
                                ["mlora", "rlora", "hydra"], [("mlora", "rlora"), ("mlora", "hydra")],
                                head_cosine, "mean inter-head cosine of B",
                                "HydraLoRA 0.76-0.80 per module; M-LoRA highest, median > 0.85 (Figure 2)", True))
        if title.startswith("2.") and claim == "1-2":
            out.extend(r[:5] + ["–"] + r[5:] for r in mechanism_rows(results))  # exact: no threshold-free column
        if title.startswith("5.") and claim == "4-5":
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
    tf = x.get("threshold_free")
    return (f"{minus(x)} {interval(x)} ({x['seeds']} seeds): **{verdict_text(x)}**"
            + (f" (threshold-free {interval(tf)}: {verdict_text(tf)})" if tf else ""))


def reading(c):
    """One claim's comparisons in words, each control beside the comparison it repeats: does the verdict hold?"""
    lines = []
    for x in c.report["comparisons"]:
        a, b = CONTROLS.get(x["a"], (x["a"],))[0], CONTROLS.get(x["b"], (x["b"],))[0]
        if (a, b) == (x["a"], x["b"]):
            lines.append(comparison_text(x))
            continue
        what, orig = CONTROLS.get(x["a"], CONTROLS.get(x["b"]))[1], c.comparison(a, b)
        lines.append(f"control ({what}): {comparison_text(x)}; " + (
            "the original pair is not measured" if orig is None else "the verdict holds"
            if orig["verdict"] == x["verdict"] else f"the verdict differs (the original's: {verdict_text(orig)}"
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
    tilted = {t: sum(tilt(v["predicted"], v["gold"]) > TILT_FLAG for r in runs.values() if (v := r["tasks"].get(t)))
              for t in {k for r in runs.values() for k in r["tasks"]}}
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
        c = read.get(claim)
        if c is None or not c.report["comparisons"]:
            continue
        seeds = sorted({x["seeds"] for x in c.report["comparisons"]})
        parts.append(f"- **Claim {claim}** ({'-'.join(map(str, (seeds[0], seeds[-1]))) if len(seeds) > 1 else seeds[0]}"
                     " seeds): " + "; ".join(reading(c)) + ".")
        if claim == "1-2":
            heads = {k: mean_se(list(v.values())) for k in ("hydra", "rlora", "mlora", *CONTROLS)
                     if (v := c.values(k, head_cosine))}
            parts.append("  Mean inter-head cosine of B: " + ", ".join(f"{name(k)} {pm(*v, 3)}"
                                                                       for k, v in heads.items()) + ".")
    return "\n".join(parts)


def render(grids, results=TUTORIAL_RESULTS):
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
    parts += [plain_reading(read), "Compute: " + compute_text(read)]
    if not grids.train and grids.has_dev() and (lr := grids.read("lr")):  # the smoke test trains no lr grid
        parts.insert(-1, lr_table(lr))
    return "\n\n".join(parts) + "\n", table


def lr_table(c):
    """Grid "lr": each method's mean dev accuracy at each learning rate, and the lr chosen once every seed is in."""
    rows = []
    for m, chosen in C.chosen_lrs(c.report).items():
        cells = [(r := c.row(f"{m}@lr{lr:g}")) and pm(*r["dev_average"]) + f" ({len(r['seeds'])} seeds)" * (
            len(r["seeds"]) > 1) or "–" for lr in C.LRS]
        rows.append([name(m), *cells, "not yet" if chosen["lr"] is None else f"{chosen['lr']:g}"])
    return (f"Each method's learning rate (grid `lr`, {len(C.CLAIMS['lr'][1])} seeds): mean accuracy (%) ± SE on the "
            f"dev split ({c.report['suite']['dev_per_task']} examples per task carved from the training pools, never "
            f"the test set) over the seeds run so far ({sum(len(r['seeds']) for r in c.report['methods'].values())} of "
            f"{len(c.labels) * len(c.seeds)} runs, {sum(r['wall_s'] for r in c.report['methods'].values()) / 3600:.1f} "
            "h of wall time); the lr with the best dev mean is chosen once every lr has every seed, and the \"@own\" "
            "grids rerun claims 1, 2, 4 and 5 at it:\n\n"
            + markdown(["method", *(f"lr {lr:g}" for lr in C.LRS), "chosen"], rows))
