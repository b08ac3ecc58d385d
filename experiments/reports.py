"""Reading the claim grids of experiments/claims.py (METHODS §7): what tutorials 03-06, 08-10 and report.py share.

`Grids.read` reads a claim's cached runs (no prepared data needed), says which are missing and returns a `Claim`
with claims.claim_report's statistics; the rest renders it as tables and plots.
"""

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from experiments import claims as C
from experiments import paper
from experiments.stats import TILT_FLAG, mean_se, t_interval, verdict

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
        out = {}
        for t in (runs[0]["tasks"] if runs else {}):
            m, se = mean_se([100 * r["tasks"][t]["accuracy"] for r in runs])
            out[t] = {"mean": m, "se": se, "collapsed": sum(r["tasks"][t]["collapsed"] for r in runs),
                      "seeds": len(runs)}
        return out

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
        by = {}
        for label, s in c.missing:
            by.setdefault(label, []).append(s)
        parts = [f"{k} (seed{'s' * (len(v) > 1)} {', '.join(map(str, v))})" for k, v in by.items()]
        if c.base is None:
            parts.append("the base model's evaluation")
        if c.damaged:
            parts.append(f"damaged and moved aside: {', '.join(c.damaged)}")
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
    out = {"a": a, "b": b, "seeds": len(seeds), "diff": m, "se": mean_se(d)[1], "per_seed": d, "low": low, "high": high}
    if low is None:
        return {**out, "verdict": "one seed: no interval"}
    return {**out, "verdict": verdict(low, high, expect_positive, identical=all(x == 0 for x in d))}


def seed_pairs(c: Claim, pairs, fn, expect_positive):
    return [x for a, b in pairs if (x := seed_paired(c, a, b, fn, expect_positive))]


def print_paired(items, what, claimed):
    """One line per seed-paired difference: its interval, seeds and verdict, and the claimed direction."""
    for x in items:
        print(f"  {what}, {name(x['a'])} − {name(x['b'])}: {interval(x, 3)} over {x['seeds']} seeds -> "
              f"{x['verdict']} (claimed: {claimed})")


def sep_ratio(run):
    return run["analysis"].get("probe", {}).get("sep_ratio")


def head_cosine(run):
    return run["analysis"].get("head_cosine_mean")


def vs_base_words(row):
    """Is a trained method above the untrained base model on the suite average (paired over seed and example)?"""
    v = row.get("vs_base")
    if v is None:
        return "base not evaluated"
    return {"reproduced": "above base", "contradicted": "BELOW base", "no difference": "= base",
            "borderline": "borderline"}.get(v["verdict"], "not resolved")


# ----------------------------------------------------------------------------------------------- formatting

def name(label):
    return NAMES.get(label, label)


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
    if x["verdict"] != "borderline":
        return x["verdict"]
    return f"borderline (bootstrap: {x['verdict_boot']}; t: {x['verdict_t']})"


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def accuracy_table(c: Claim, labels=None):
    """Per method: seeds, suite average, − base (95%), trainable, collapses, tilts; base and majority rows first."""
    maj = c.majority()
    rows = []
    if c.report["base"]:
        b = c.report["base"]
        rows.append(["base model (no training)", "–", f"{b['average']:.1f}", "–", "–", "0",
                     ", ".join(c.base_collapsed()) or "–"])
    if maj:
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
        rows.append([f"{name(x['a'])} − {name(x['b'])}", interval(x), str(x["seeds"]), verdict_text(x),
                     f"{interval(tf)}: {verdict_text(tf)}" if tf else "–", paper_text(c.claim, x)])
        tasks += [[f"{name(x['a'])} − {name(x['b'])}", t, interval(v), verdict_text(v)]
                  for t, v in x["per_task"].items() if "verdict" in v]
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
    cell = pm(s["mean"], s["se"])
    return cell + (f" (c {s['collapsed']}/{s['seeds']})" if s["collapsed"] else "")


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
    note = ""
    if column_of and missing:
        note = (f"\n\nThe paper's columns not in our suite: {', '.join(missing)}; its averages are over its own "
                f"tasks, ours over ours.")
    return markdown(head, rows) + note


PROBE = ("sep_ratio", "sep_within", "heldout_kl")


def probe_table(c: Claim, labels):
    """Print the separation probe of each method (mean ± SE over seeds); return {label: {key: (mean, SE)}}."""
    probe = {}
    for k in labels:
        runs = [r for r in c.runs.get(k) or [] if "probe" in r["analysis"]]
        if runs:
            probe[k] = {key: mean_se([r["analysis"]["probe"][key] for r in runs]) for key in PROBE}
    print("\nheld-out A-output probe (mean ± SE over seeds):\n")
    print(markdown(["method", "seeds", "separation (between/within)", "within-task spread", "held-out KL"],
                   [[name(k), str(len(c.values(k, sep_ratio))), *[pm(*p[key], 3) for key in PROBE]]
                    for k, p in probe.items()]) if probe else "(not measured yet)")
    return probe


def suite_text(c: Claim):
    s = c.report["suite"]
    n = sorted({len(r["seeds"]) for r in c.report["methods"].values()})
    seeds = "no runs" if not n else f"{n[0]} seeds" if len(n) == 1 else f"{n[0]}-{n[-1]} seeds"
    model = "the tiny random model" if c.tiny else s["model"]
    return (f"{model}, {len(s['tasks'])} tasks ({', '.join(s['tasks'])}), {s['fmt']} format scored by {s['mode']}"
            f", {s['steps']} steps x {s['batch_per_task']} per task, lr {s['lr']:g}, "
            f"{s['test_per_task'] or 'all'} test examples per task; {seeds}")


# ----------------------------------------------------------------------------------------------- plots

def bars(ax, c: Claim, labels, title=""):
    """Suite average per method (bar: mean, error bar: SE, dots: seeds); base model dashed, majority dotted."""
    labels = [k for k in labels if c.row(k)]
    mean = [c.row(k)["average"] for k in labels]
    ax.bar(range(len(labels)), mean, yerr=[bar(c.row(k)["se"]) for k in labels], color="lightsteelblue", capsize=4)
    for i, k in enumerate(labels):
        ax.plot([i] * len(c.row(k)["per_seed"]), c.row(k)["per_seed"], "k.", ms=4)
    ys = [v for k in labels for v in c.row(k)["per_seed"]]
    if c.report["base"]:
        ax.axhline(c.report["base"]["average"], color="gray", ls="--", lw=1, label="base model")
        ys.append(c.report["base"]["average"])
    if c.majority():
        ax.axhline(c.majority()["average"], color="gray", ls=":", lw=1, label="majority label")
        ys.append(c.majority()["average"])
    ax.set_xticks(range(len(labels)), [name(k) for k in labels], rotation=20, fontsize=7, ha="right")
    if ys:
        ax.set_ylim(max(0, min(ys) - 3), min(100, max(ys) + 3))
    ax.set(ylabel="suite average accuracy (%)", title=title)
    ax.legend(fontsize=7)


def comparison_items(c: Claim):
    """[(text, comparison, the paper's difference or None)] of the claim's comparisons, for `diffs`."""
    return [(f"{name(x['a'])} − {name(x['b'])}", x, paper.paper_diff(c.claim, x["a"], x["b"]))
            for x in c.report["comparisons"]]


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
