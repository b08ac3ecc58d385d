"""The paper's claims (METHODS §7) as paired multi-seed grids on the screened small-scale suite.

    python experiments/claims.py run                 # trains what is missing, claims in the order below (hours)
    python experiments/claims.py run --only 1-2,4-5  # some claims only
    python experiments/claims.py run --only 10 --seeds 0,1 --methods meta-k64,lora-k64  # a subset of a grid
    python experiments/claims.py report              # the claim table (markdown) from the cached runs, in seconds
    python experiments/claims.py recheck --only 4-5 --seeds 0 --methods lora-r8   # retrain a cached run, compare
    python experiments/claims.py run --only lr; python experiments/claims.py run --only 1-2@own,4-5@own

Each claim is a grid (experiments/grid.py) with the paper's configurations scaled to this model (rank 4 x 3 heads
on gate/up/down, rank 8 for Align-LoRA); claims 1, 2 and 8 carry step-size and init control rows. Grid "lr" picks
each method's learning rate on dev (`chosen_lrs`), and the "@own" grids rerun claims 1, 2, 4 and 5 at it.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` from a plain checkout
from experiments.grid import RESULTS, ROOT, WORK, Grid, Method, Suite, write_json  # noqa: E402

import numpy as np  # noqa: E402

from experiments.stats import TILT_FLAG, auroc, compare, compare_threshold_free, describe, mean_se, tilt  # noqa: E402

# the screening's (experiments/screening.md) three qualifying cloze tasks; their answers fit seq_len 256
SUITE = Suite(tasks=("sst2", "arc-easy", "siqa"), fmt="cloze", mode="cloze", steps=200, batch_per_task=2, lr=1e-3,
              warmup=20, seq_len=256, test_per_task=500)
SEEDS = [0, 1, 2, 3, 4]
# every choice is made on the dev split (data/README.md), never on the test set
DEV_SUITE = dataclasses.replace(SUITE, dev_per_task=300)
LRS = (3e-4, 1e-3, 3e-3)
LR_METHODS = ("lora-r8", "hydra", "hydra-norouter", "rlora", "mlora", "mlora-mean", "a-lora-k", "a-lora-m")
MLP = "gate_proj,up_proj,down_proj"


def lam(paper_lambda, n_tasks):
    """The paper's λ (on a SUM over task pairs, Eq. 5) in our units (a mean over pairs, METHODS §3.5)."""
    return paper_lambda * n_tasks * (n_tasks - 1) / 2


def methods(n_tasks, model_cfg):
    """Every method of every claim, by label (a label is one train.py configuration)."""
    multi = dict(rank=4, heads=3, targets=MLP)
    align = dict(adapter="align", rank=8, targets=MLP)
    m = {
        "hydra": Method({"adapter": "hydra", **multi}, analyses=("heads", "spectrum")),
        "hydra-norouter": Method({"adapter": "hydra-norouter", **multi}, analyses=("heads",)),
        "rlora": Method({"adapter": "rlora", **multi}, analyses=("heads", "spectrum", "probe")),
        "mlora": Method({"adapter": "mlora", **multi}, analyses=("heads", "probe")),
        "lora-r8": Method({"adapter": "lora", "rank": 8, "targets": MLP}, analyses=("probe",)),
        "a-lora-k": Method({**align, "align_loss": "kl", "align_lambda": lam(0.1, n_tasks)}, analyses=("probe",)),
        "a-lora-m": Method({**align, "align_loss": "mmd", "align_lambda": lam(0.1, n_tasks)}, analyses=("probe",)),
        "lora-budget": Method({"adapter": "lora", "rank": budget_rank(model_cfg), "targets": MLP},
                              analyses=("spectrum",)),
        **{f"{a}+align": Method({"adapter": a, **multi, "align_any": True, "align_lambda": lam(0.1, n_tasks)},
                                analyses=("heads", "probe")) for a in ("rlora", "mlora")},
        # claim 8's baseline: HydraLoRA at R-LoRA's scale α/√r, so +MT and +Init change one ingredient each
        **{label: Method({"adapter": "rlora", **multi, "adapter_options": opts}, analyses=("heads",))
           for label, opts in (("hydra-rs", "multi_head_dropout=false,random_init=false"),
                               ("hydra+mt", "random_init=false"), ("hydra+init", "multi_head_dropout=false"))},
    }
    # controls of claims 1, 2 and 8: summed heads move ΔW ~3x faster; R-LoRA's paper init is ~100x its code's
    for label, base, opts in (("mlora-mean", "mlora", "head_reduction=mean"),
                              ("hydra-norouter-mean", "hydra-norouter", "head_reduction=mean"),
                              ("rlora-cf", "rlora", "code_faithful=true"),
                              ("mlora-cf", "mlora", "code_faithful=true"),
                              ("hydra+init-cf", "hydra+init", "code_faithful=true")):
        o = m[base].options
        m[label] = Method({**o, "adapter_options": ",".join(filter(None, (o.get("adapter_options"), opts)))},
                          analyses=m[base].analyses)
    m.update({f"{label}@lr{lr:g}": Method({**m[label].options, "lr": lr}, analyses=m[label].analyses)
              for label in LR_METHODS for lr in LRS})  # each method at each learning rate of the lr grid
    for lp in (0.01, 0.05, 0.5):
        m[f"a-lora-k-l{lp}"] = Method({**align, "align_loss": "kl", "align_lambda": lam(lp, n_tasks)})
    # claim 10 (METHODS §2.9): per K in SHOTS, MeTA-LoRA and the standard trainer on the same K examples per task, with
    # LoRA r=8's options; support 2 + query 2 match the standard trainer's 2 per task per step
    lora, meta = m["lora-r8"].options, {"trainer": "meta", "meta_support": 2, "meta_query": 2}
    for k in SHOTS:
        m[f"meta-k{k}"] = Method({**lora, **meta, "shots": k})
        m[f"lora-k{k}"] = Method({**lora, "shots": k})
    for a in META_ALPHAS:
        m[f"meta-k16-a{a}"] = Method({**lora, **meta, "shots": 16, "meta_inner_lr": a})
    return m


# claim 10 (MeTA-LoRA, METHODS §2.9): K examples per task, the most informative K first
SHOTS = (64, 16, 256)
# grid 10-alpha: MeTA-LoRA's inner lr around the default 0.03 at K = 16 (tutorial 10, section 2)
META_ALPHAS = (0.01, 0.1, 0.3)
# in α order, the default (claim 10's meta-k16 run) in its place
ALPHA_ROWS = [*(f"meta-k16-a{a}" for a in META_ALPHAS if a < 0.03), "meta-k16",
              *(f"meta-k16-a{a}" for a in META_ALPHAS if a > 0.03)]


def budget_rank(model_cfg):
    """The LoRA rank with HydraLoRA's (rank 4, 3 heads) parameter count on gate/up/down (METHODS §2.2)."""
    import torch
    from nanoalign.adapters import apply_adapter, count_trainable, rank_for_budget
    from nanoalign.model import CausalLM
    with torch.device("meta"):
        model = CausalLM(model_cfg)
    apply_adapter(model, "hydra", rank=4, heads=3, targets=MLP.split(","))
    return rank_for_budget(model_cfg, MLP.split(","), count_trainable(model))


def model_config(name):
    from nanoalign.plumbing.hub import resolve_model
    from nanoalign.model import ModelConfig
    return ModelConfig.from_json(resolve_model(name) / "config.json")


CONTROLS_1_2 = ["mlora-mean", "rlora-cf", "mlora-cf", "hydra-norouter-mean"]
CONTROLS_8 = ["hydra+init-cf", "rlora-cf"]

OWN = "@own"  # a method at the learning rate the lr grid chose for it on dev (`chosen_lrs`)

# claim -> (labels, seeds, [(A, B, the paper's sign of A − B is positive?, the paper's numbers)])
CLAIMS = {
    "1-2": (["hydra", "hydra-norouter", "rlora", "mlora", *CONTROLS_1_2], SEEDS, [
        ("mlora", "rlora", True, "75.45 vs 74.67"), ("mlora", "hydra", True, "75.45 vs 74.04"),
        ("hydra-norouter", "hydra", False, "73.58 vs 74.04"),
        ("mlora-mean", "rlora", True, "control: M-LoRA's heads averaged"),
        ("mlora-mean", "hydra", True, "control: M-LoRA's heads averaged"),
        ("mlora-cf", "rlora-cf", True, "control: both at the released code's init"),
        ("mlora-cf", "hydra", True, "control: M-LoRA at the released code's init"),
        ("hydra-norouter-mean", "hydra", False, "control: heads averaged")]),
    "4-5": (["lora-r8", "a-lora-k", "a-lora-m"], SEEDS, [
        ("a-lora-k", "lora-r8", True, "Table 5 (3B): 80.06 vs 76.48"),
        ("a-lora-k", "a-lora-m", True, "80.06 vs 78.35")]),
    "3": (["lora-budget", "hydra", "rlora"], SEEDS, [
        ("lora-budget", "hydra", None, "LoRA¹⁰ 49.51 vs HydraLoRA 49.12 (Qwen2.5-7B BBH)"),
        ("lora-budget", "rlora", None, "LoRA¹⁰ 49.51 vs R-LoRA 49.51")]),
    "9": (["rlora", "rlora+align", "mlora", "mlora+align"], SEEDS, [
        ("rlora+align", "rlora", True, "improves (Table 9, no numbers reachable)"),
        ("mlora+align", "mlora", True, "improves (Table 9)")]),
    "6": (["lora-r8", "a-lora-k-l0.01", "a-lora-k-l0.05", "a-lora-k", "a-lora-k-l0.5"], SEEDS[:3], [
        (f"a-lora-k{s}", "lora-r8", True, "A-LoRA-K above LoRA at every λ in [0.01, 0.5]")
        for s in ("-l0.01", "-l0.05", "", "-l0.5")]),
    "8": (["hydra-rs", "hydra+mt", "hydra+init", "rlora", *CONTROLS_8], SEEDS, [
        ("hydra+mt", "hydra-rs", True, "+0.33 (0.5B, 5 tasks)"), ("hydra+init", "hydra-rs", True, "+0.29"),
        ("rlora", "hydra-rs", True, "+0.90"),
        ("hydra+init-cf", "hydra-rs", True, "control: +0.29 at the released code's init"),
        ("rlora-cf", "hydra-rs", True, "control: +0.90 at the released code's init")]),
    # sign None: judged by `equivalence_verdict`
    "10": (["meta-k64", "lora-k64", "lora-r8", "meta-k16", "lora-k16", "meta-k256", "lora-k256"], SEEDS, [
        c for k in SHOTS for c in (
            (f"meta-k{k}", f"lora-k{k}", True, "abstract: above multi-task LoRA on the same few samples"),
            (f"meta-k{k}", "lora-r8", None, "abstract: matches or beats multi-task LoRA on all the data"))]),
    "lr": ([f"{m}@lr{lr:g}" for m in LR_METHODS for lr in LRS], SEEDS[:3], []),
}
for _c, _n, _pairs in (("1-2", 5, 4), ("4-5", 3, 2)):  # claims 1, 2, 4, 5: the first methods and pairs at their OWN lr
    CLAIMS[_c + OWN] = ([k + OWN for k in CLAIMS[_c][0][:_n]], SEEDS,
                        [(a + OWN, b + OWN, sign, paper) for a, b, sign, paper in CLAIMS[_c][2][:_pairs]])
CLAIMS["10-alpha"] = (["lora-k16", *ALPHA_ROWS], SEEDS, [
    (a, "lora-k16", True, "abstract: above multi-task LoRA on the same few samples") for a in ALPHA_ROWS])


def grid(claim, suite=None, seeds=None, controls=True, **where):
    """The grid of one claim on SUITE (or `suite`), without the control rows if not `controls`; `where`: Grid's
    results_dir / work_dir."""
    labels, claim_seeds, _ = CLAIMS[claim]
    if not controls:
        labels = [k for k in labels if k not in {*CONTROLS_1_2, *CONTROLS_8}]
    suite = suite or (DEV_SUITE if claim == "lr" else SUITE)
    if suite is None:
        raise SystemExit("error: experiments/claims.py has no SUITE yet: run experiments/screening.py and set it")
    every = methods(len(suite.tasks), model_config(suite.model))
    if any(k.endswith(OWN) for k in labels):
        lr_where = {k: v for k, v in where.items() if k in ("results_dir", "work_dir")}
        lr_suite = None if suite is SUITE else dataclasses.replace(suite, dev_per_task=suite.dev_per_task or
                                                                   DEV_SUITE.dev_per_task)
        chosen = chosen_lrs(dev_means(grid("lr", suite=lr_suite, controls=controls, **lr_where)))
        every.update({f"{m}{OWN}": Method({**every[m].options, "lr": c["lr"]}, analyses=every[m].analyses)
                      for m, c in chosen.items() if c["lr"] is not None})
        labels = [k for k in labels if k in every]  # a method whose lr is not chosen yet has no row yet
    return Grid(f"claim-{claim}", suite, {k: every[k] for k in labels}, seeds or claim_seeds, **where)


def dev_average(runs):
    """(mean, SE) of the runs' dev accuracies (%), or None unless every run has a dev score."""
    return mean_se([100 * r["dev"]["average"] for r in runs]) if runs and all("dev" in r for r in runs) else None


def dev_means(g):
    """{"methods": {label: {"seeds", "dev_average"}}} of a grid's cached runs with a dev score: the part of
    claim_report that chosen_lrs reads, without its bootstraps."""
    return {"methods": {label: {"seeds": [r["seed"] for r in runs], "dev_average": dev}
                        for label, runs in g.results().items() if label != "base" and (dev := dev_average(runs))}}


def chosen_lrs(lr_report):
    """{method: {"lr": best mean dev accuracy's lr (None until every lr has every seed), "dev": {lr: mean}}}."""
    out = {}
    for m in LR_METHODS:
        rows = {lr: lr_report["methods"].get(f"{m}@lr{lr:g}") for lr in LRS}
        dev = {lr: r["dev_average"][0] for lr, r in rows.items() if r and "dev_average" in r}
        full = len(dev) == len(LRS) and all(r["seeds"] == list(CLAIMS["lr"][1]) for r in rows.values())
        out[m] = {"lr": max(dev, key=dev.get) if full else None, "dev": dev}
    return out


def correctness(runs, seeds):
    """{task: [seeds, examples]} 0/1 of the runs (by seed) for the given seeds."""
    by_seed = {r["seed"]: r for r in runs}
    tasks = sorted(next(iter(by_seed.values()))["predictions"])
    return {t: np.array([by_seed[s]["predictions"][t]["correct"] for s in seeds]) for t in tasks}


def margins(run, task):
    """(score 1 − score 0, gold is option 1) of a two-option task from a run's stored scores, else None; option
    order is read back from the predictions."""
    p = run["predictions"][task]
    if not p.get("scores") or any(len(x) != 2 for x in p["scores"]):
        return None
    scores = np.asarray(p["scores"], dtype=float)
    labels = set(p["gold"]) | set(p["pred"])
    option = {label: int(i) for label, i in zip(p["pred"], scores.argmax(1))}  # label -> its option index
    if len(labels) != 2 or len(set(option.values())) != len(option):
        return None
    one = [k for k, i in option.items() if i == 1] or [k for k in labels if k not in option]
    return scores[:, 1] - scores[:, 0], np.array([g == one[0] for g in p["gold"]])


def scored_tasks(runs, seeds):
    """{task: {"margin", "positive"}} for two-option tasks, {"correct"} otherwise: compare_threshold_free's input."""
    by_seed, out = {r["seed"]: r for r in runs}, {}
    for t, correct in correctness(runs, seeds).items():
        m = [margins(by_seed[s], t) for s in seeds]
        if all(x is not None for x in m) and all(np.array_equal(x[1], m[0][1]) for x in m):
            out[t] = {"margin": np.stack([x[0] for x in m]), "positive": m[0][1]}
        else:
            out[t] = {"correct": correct}
    return out


def threshold_diagnostics(runs):
    """Per task over the runs: mean and largest tilt, seeds tilted past TILT_FLAG, AUROC of two-option tasks; and
    per seed the threshold-free suite average (AUROC for two-option tasks, accuracy otherwise)."""
    tasks, suite = {}, []
    for r in runs:
        scores = []
        for t, v in r["tasks"].items():
            d = tasks.setdefault(t, {"tilt": [], "auroc": []})
            d["tilt"].append(100 * tilt(v["predicted"], v["gold"]))
            m = margins(r, t)
            if m is not None:
                d["auroc"].append(100 * auroc(*m))
            scores.append(d["auroc"][-1] if m is not None else 100 * v["accuracy"])
        suite.append(float(np.mean(scores)))
    out = {t: {"tilt": float(np.mean(d["tilt"])), "tilt_max": max(d["tilt"]),
               "tilted_seeds": sum(x > 100 * TILT_FLAG for x in d["tilt"]), "seeds": len(d["tilt"]),
               **({"auroc": float(np.mean(d["auroc"]))} if d["auroc"] else {})} for t, d in tasks.items()}
    return out, suite


def equivalence_verdict(low, high):
    """The verdict on "A matches B" (claims 3 and 10) from the 95% interval [low, high] of A − B in points."""
    if -1 < low and high < 1:
        return "equivalent within ±1 point"
    if low > -1:
        return "not worse (interval above −1)"
    if high < -1:
        return "worse"
    # reaches past −1 and up to above it: undecided, unless it stays under 0 (below, but not by a resolved point)
    return "below (interval under 0)" if high < 0 else "not resolved"


def claim_report(claim, g=None, **grid_args):
    """One claim's rows: per method mean ± SE over seeds, the base model, each paired comparison and verdict."""
    g = g or grid(claim, **grid_args)
    res = g.results()
    base = res.pop("base")
    out = {"claim": claim, "suite": g.suite.describe(), "methods": {}, "comparisons": [], "base": None}
    if base:
        diag, tf = threshold_diagnostics([base])
        tasks = {t: 100 * v["accuracy"] for t, v in base["tasks"].items()}
        out["base"] = {"average": 100 * base["average"], "tasks": tasks, "diagnostics": diag, "threshold_free": tf[0]}
    for label, runs in res.items():
        if not runs:
            continue
        avg = [100 * r["average"] for r in runs]
        m, se = mean_se(avg)
        row = {"seeds": [r["seed"] for r in runs], "average": m, "se": se, "per_seed": avg,
               "tasks": {t: float(np.mean([100 * r["tasks"][t]["accuracy"] for r in runs])) for t in runs[0]["tasks"]},
               "collapsed": sorted({t for r in runs for t, v in r["tasks"].items() if v["collapsed"]}),
               "trainable": runs[0]["trainable"], "wall_s": sum(r["wall_s"] for r in runs)}
        if dev := dev_average(runs):
            row["dev_average"] = dev
        row["diagnostics"], tf = threshold_diagnostics(runs)
        row["threshold_free"] = mean_se(tf)
        row["tilted"] = sorted(t for t, d in row["diagnostics"].items() if d["tilted_seeds"])
        if (heads := [r["analysis"]["head_cosine_mean"] for r in runs
                      if r["analysis"].get("head_cosine_mean") is not None]):
            row["head_cosine"] = mean_se(heads)
        if (probes := [r["analysis"]["probe"]["sep_ratio"] for r in runs if "probe" in r["analysis"]]):
            row["sep_ratio"] = mean_se(probes)
        if base:  # is the method trained at all? paired against the base model on every seed
            seeds = row["seeds"]
            c = compare(correctness(runs, seeds), {t: np.tile(base["predictions"][t]["correct"], (len(seeds), 1))
                                                   for t in base["predictions"]}, n_boot=4000)
            row["vs_base"] = {k: c[k] for k in ("diff", "low", "high", "t_low", "t_high", "verdict", "verdict_boot",
                                                "verdict_t")}
        out["methods"][label] = row
    for a, b, positive, paper in CLAIMS[claim][2]:
        if a not in out["methods"] or b not in out["methods"]:
            continue
        seeds = sorted(set(out["methods"][a]["seeds"]) & set(out["methods"][b]["seeds"]))
        sign = positive is not False  # "matches" (None): tested as A ≥ B, then judged within ±1 point below
        c = compare(correctness(res[a], seeds), correctness(res[b], seeds), expect_positive=sign, n_boot=10_000)
        c["threshold_free"] = compare_threshold_free(scored_tasks(res[a], seeds), scored_tasks(res[b], seeds),
                                                     expect_positive=sign)
        if positive is None:  # "matches": judged by whether each interval lies within ±1 point
            for x in (c, c["threshold_free"]):
                x["verdict_boot"] = equivalence_verdict(x["low"], x["high"])
                x["verdict_t"] = None if x["t_low"] is None else equivalence_verdict(x["t_low"], x["t_high"])
                x["verdict"] = (x["verdict_boot"] if x["verdict_t"] in (None, x["verdict_boot"]) else "borderline")
        out["comparisons"].append({"a": a, "b": b, "paper": paper, **c, "text": describe(c)})
    return out


def recheck(claims, args, wanted):
    """Retrain the selected cached runs into --scratch; each comparison with the cache goes to results/rechecks/."""
    if not wanted or not args.seeds:
        raise SystemExit("error: recheck needs --methods (or base) and --seeds: it retrains, so say which runs")
    seeds = [int(s) for s in args.seeds.split(",")]
    where = lambda m: f"{m['host']}, {m['torch_threads']} threads, commit {m['commit']}"  # noqa: E731
    out = []
    for c in claims:
        labels = [m for m in args.methods.split(",") if m in CLAIMS[c][0] or m == "base"]
        if not labels:
            continue
        g = grid(c, seeds=seeds)
        for label in labels:
            for seed in ([None] if label == "base" else seeds):
                try:
                    r = g.recheck(label, seed, Path(args.scratch))
                except ValueError as e:
                    raise SystemExit(f"error: {e}; train it first with `python experiments/claims.py run --only {c}`")
                write_json(RESULTS / "rechecks" / f"{r['key']}.json", r)
                out.append(r)
                print(f"{label} seed {seed}: cache {100 * r['old']['average']:.2f}% ({where(r['old']['machine'])}) vs "
                      f"now {100 * r['new']['average']:.2f}% ({where(r['new']['machine'])}); predictions agree on "
                      f"{r['agree']} of {r['n']}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "report", "recheck"])
    p.add_argument("--only", default="", help="comma list of claims (default: all, in order)")
    p.add_argument("--seeds", default="", help="comma list: run only these of each claim's seeds (e.g. 0,1 first "
                                               "for every claim, the rest later; the cache keeps what is done)")
    p.add_argument("--methods", default="", help="comma list: run only these of each claim's methods (e.g. "
                                                 "meta-k64,lora-k64 for claim 10's first K)")
    p.add_argument("--scratch", default=str(WORK / "recheck"), help="recheck: where the retrained runs go "
                                                                   "(resumable; default %(default)s)")
    args = p.parse_args(argv)
    claims = [c for c in CLAIMS if not args.only or c in args.only.split(",")]
    wanted = set(args.methods.split(",")) if args.methods else None
    known = set().union(*(CLAIMS[c][0] for c in claims)) | ({"base"} if args.what == "recheck" else set())
    if wanted and (unknown := wanted - known):
        raise SystemExit(f"error: --methods {','.join(sorted(unknown))}: no such method in claims "
                         f"{','.join(claims)} (see CLAIMS in experiments/claims.py)")
    if args.what == "recheck":
        return recheck(claims, args, wanted)
    busy = []  # runs another driver was training (run): listed at the end
    if args.what == "run":
        for c in claims:
            seeds = [s for s in CLAIMS[c][1] if not args.seeds or str(s) in args.seeds.split(",")]
            if not seeds or (wanted and not wanted & set(CLAIMS[c][0])):
                continue
            g = grid(c, seeds=seeds)
            if wanted:
                g.methods = {k: v for k, v in g.methods.items() if k in wanted}
            g.run()
            busy += [f"claim {c} {label}{'' if s is None else f' seed {s}'} ({who})" for label, s, who in g.busy]
    grids = {c: grid(c) for c in claims}
    report = {c: claim_report(c, grids[c]) for c in claims}
    for c, g in grids.items():  # what the report lacks, damaged runs (moved aside) included
        if missing := g.missing():
            print(f"claim {c}: {len(missing)} run(s) missing: " + ", ".join(f"{m} seed {s}" for m, s in missing)
                  + (f" (damaged, moved aside: {', '.join(g.damaged)})" if g.damaged else ""), file=sys.stderr)
    # --only updates its claims and keeps the others' last report
    path = ROOT / "experiments" / "claims.json"
    kept = json.loads(path.read_text()) if args.only and path.exists() else {}
    write_json(path, {c: report.get(c, kept.get(c)) for c in CLAIMS if c in report or c in kept})
    print(json.dumps({c: [x["text"] + f" {x['a']} vs {x['b']}: {x['verdict']}" for x in r["comparisons"]]
                      for c, r in report.items()}, indent=1))
    if "lr" in report:  # dev averages so far; an lr is chosen once every lr has the same seeds
        rows = report["lr"]["methods"]
        for m, c in chosen_lrs(report["lr"]).items():
            print(f"lr grid, {m}: dev average (seeds) " + ", ".join(
                f"{lr:g} {v:.2f} ({len(rows[f'{m}@lr{lr:g}']['seeds'])})" for lr, v in c["dev"].items())
                + "; chosen: " + ("not yet" if c["lr"] is None else f"{c['lr']:g}"))
    if busy:
        print(f"skipped {len(busy)} run(s) another driver was training (run again when it is done): "
              + "; ".join(busy), file=sys.stderr)


if __name__ == "__main__":
    main()
