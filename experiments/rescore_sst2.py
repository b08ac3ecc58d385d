"""The claim grids' SST-2 numbers re-scored on lm-evaluation-harness's strings (README, "lm-evaluation-harness").

The grids score SST-2 in the `cloze` format, whose sentences are stripped; lm-eval's strings keep GLUE's trailing
space. For the base model and every cached claims-suite run whose adapter is still in experiments/work (the others
would need retraining), `run` scores the run's 500 SST-2 test sentences in both formats exactly as the grid did
(merged where mergeable, grid.Grid.evaluate's scorer), checks that the `cloze` predictions equal the cached ones, and
caches per run the accuracy in both formats, the predictions that flip and the share answered "positive".

    python experiments/rescore_sst2.py run --data DIR   # DIR/glue/{cloze,lm-eval}/sst2-test.jsonl (data/prepare.py)
    python experiments/rescore_sst2.py readme           # the README block from experiments/results/sst2_lm_eval.json
"""

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import grid as G  # noqa: E402
from experiments.claims import SUITE  # noqa: E402
from experiments.reports import name, pm, replace_block  # noqa: E402
from experiments.stats import mean_se, t_interval  # noqa: E402

CACHE = G.RESULTS / "sst2_lm_eval.json"
BEGIN, END = "<!-- rescore_sst2.py: begin -->", "<!-- rescore_sst2.py: end -->"
FORMATS = ("cloze", "lm-eval")


def score(model, tok, test, names):
    """{format: (predictions, accuracy)} of the SST-2 test examples in each format, as the grid scores them."""
    out = {}
    for fmt, examples in test.items():
        res = G.evaluate(model, tok, {"sst2": examples}, mode="cloze", task_ids={t: i for i, t in enumerate(names)},
                         scorer=G.fast.choice_logprobs)["sst2"]
        out[fmt] = ([x["pred"] for x in res["records"]], res["accuracy"])
    return out


def record(r, scored, idx, wall_s):
    (cz, acc_c), (lm, acc_l) = scored["cloze"], scored["lm-eval"]
    cached = r["predictions"]["sst2"]
    # each prediction as one character, 1 = "positive": what any later statistic needs, in 1 kB a run
    pos = {f: "".join(str(int(x.strip() == "positive")) for x in preds) for f, preds in zip(FORMATS, (cz, lm))}
    return {"label": r["label"], "grid": r.get("grid"), "seed": r.get("seed"), "cached": r["tasks"]["sst2"]["accuracy"],
            "same_as_cache": cz == cached["pred"] and idx == cached["index"], "cloze": acc_c, "lm-eval": acc_l,
            "flips": sum(a != b for a, b in zip(pos["cloze"], pos["lm-eval"])), "n": len(cz), "positive": pos,
            "machine": G.machine(), "wall_s": round(wall_s, 1)}


def run(data_dir):
    load = lambda fmt: G.load_tasks("sst2", "test", data_dir=data_dir, max_per_task=SUITE.test_per_task, seed=0,
                                    fmt=fmt)["sst2"]
    test = {fmt: load(fmt) for fmt in FORMATS}
    if [x["prompt"].replace(" \n", "\n") for x in test["lm-eval"]] != [x["prompt"] for x in test["cloze"]]:
        raise SystemExit(f"error: the cloze and lm-eval SST-2 test files under {data_dir} are not the same sentences:"
                         f" prepare both with data/prepare.py glue")
    cache = G.system.read_json(CACHE) if CACHE.exists() else {"runs": {}}
    runs = [r for p in sorted(G.RESULTS.glob("runs/*.json")) if (s := (r := G.system.read_json(p)).get("suite", {}))
            and s["tasks"] == list(SUITE.tasks) and s["test_per_task"] == SUITE.test_per_task]
    runs.sort(key=lambda r: (r["label"] != "base", "@" in r["label"], r["label"], r.get("seed")))  # claims first
    grid = G.Grid("rescore", SUITE, {}, [0])
    base, tok = grid.base_model()
    for r in runs:
        adapter = G.WORK / r["key"] / "adapter"
        if r["key"] in cache["runs"] or not (r["label"] == "base" or (adapter / "adapter.safetensors").exists()):
            continue
        if r["label"] == "base" and any(x["label"] == "base" for x in cache["runs"].values()):
            continue  # the claims suite and its dev-split variant share the base model's test scores
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        if r["label"] != "base":
            G.load_adapter(model, adapter)
            try:
                G.merge_adapters(model)  # as grid.run_one scored it
            except ValueError:
                pass
        cache["runs"][r["key"]] = rec = record(r, score(model, tok, test, sorted(r["suite"]["tasks"])),
                                               [x["index"] for x in test["cloze"]], time.perf_counter() - t0)
        G.write_json(CACHE, cache)
        print(f"{r['label']} seed {r.get('seed')}: cloze {100 * rec['cloze']:.1f} (cache "
              f"{'equal' if rec['same_as_cache'] else 'DIFFERS'}), lm-eval {100 * rec['lm-eval']:.1f}, "
              f"{rec['flips']} flips", flush=True)


def share(rec, fmt):
    """The share of the run's predictions that are "positive" in one format."""
    return rec["positive"][fmt].count("1") / len(rec["positive"][fmt])


def table_row(text, recs, seeded=True):
    """One table row over a run's seeds: accuracy in both formats (mean ± SE), the shift, flips, "positive" shares."""
    cells = [pm(*mean_se([100 * r[f] for r in recs])) if seeded else f"{100 * recs[0][f]:.1f}" for f in FORMATS]
    shift = mean_se([100 * (r["lm-eval"] - r["cloze"]) for r in recs])[0]
    flips = sum(r["flips"] for r in recs) / len(recs)
    shares = " → ".join(f"{100 * sum(share(r, f) for r in recs) / len(recs):.0f}" for f in FORMATS)
    return f"| {text} | {len(recs) if seeded else '–'} | {cells[0]} | {cells[1]} | {shift:+.1f} | {flips:.0f} | {shares} |"


def render(cache):
    """The README block: per method, SST-2 accuracy on both string sets; paired differences between methods."""
    if not cache["runs"]:
        return "Not re-scored yet: `python experiments/rescore_sst2.py run --data DIR`."
    runs = [x for x in cache["runs"].values() if x["label"] != "base"]
    by = {}
    for x in runs:
        by.setdefault((x["grid"], x["label"]), {})[x["seed"]] = x
    rows = [table_row("base model", [x], seeded=False) for x in cache["runs"].values() if x["label"] == "base"]
    rows += [table_row(f"{name(k)} ({g})", list(v.values())) for (g, k), v in sorted(by.items())]
    pairs = []
    for (g, a), (h, b) in itertools.combinations(sorted(by), 2):
        seeds = sorted(set(by[g, a]) & set(by[h, b]))
        if g == h and len(seeds) >= 3:
            cells = ["{:+.2f} [{:+.2f}, {:+.2f}]".format(*t_interval([100 * (by[g, a][s][f] - by[h, b][s][f])
                                                                       for s in seeds])) for f in FORMATS]
            pairs.append(f"| {name(a)} − {name(b)} ({g}) | {len(seeds)} | {cells[0]} | {cells[1]} |")
    shifts = sorted(100 * (x["lm-eval"] - x["cloze"]) for x in runs)
    flips = sorted(x["flips"] for x in runs)
    summary = (f"Over the {len(runs)} trained runs, lm-eval's strings move SST-2 accuracy by {shifts[0]:+.1f} to "
               f"{shifts[-1]:+.1f} points (mean {sum(shifts) / len(shifts):+.2f}) and flip {flips[0]}-{flips[-1]} of "
               f"the 500 predictions (median {flips[len(flips) // 2]})." if runs else "")
    same = sum(x["same_as_cache"] for x in cache["runs"].values())
    return "\n".join([
        f"Re-scored by `python experiments/rescore_sst2.py run`: {len(runs)} trained runs whose adapters are still in "
        f"experiments/work, and the base model; the `cloze` predictions of {same} of these {len(cache['runs'])} equal "
        f"the cached ones on every example. SST-2 test accuracy (%, mean ± SE over seeds) on the same 500 sentences "
        f"with nanoalign's stripped strings (`cloze`) and with lm-eval's (`lm-eval`). {summary}", "",
        "| run (grid) | seeds | cloze | lm-eval | lm-eval − cloze | predictions flipped (of 500) | % answered "
        "positive |", "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Paired differences between methods of one grid on SST-2 (points, seed-level t interval, 95%):", "",
        "| difference | seeds | cloze | lm-eval |", "|---|---:|---:|---:|", *pairs])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("run", "readme"))
    p.add_argument("--data", default=G.DATA_DIR, help="the folder data/prepare.py wrote (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.what == "run":
            return run(args.data)
        readme = Path(__file__).resolve().parents[1] / "README.md"
        readme.write_text(render_readme(readme.read_text(), G.system.read_json(CACHE)))
    except (OSError, ValueError) as e:  # missing data, a damaged cache: one line that says what to do
        raise SystemExit(f"error: {e}") from None


def render_readme(text, cache):
    return replace_block(text, render(cache), BEGIN, END)


if __name__ == "__main__":
    main()
