"""The README's quick start, measured: runs the README's commands as a user would (in a scratch directory), times
each, and caches what they measured in experiments/results/quickstart.json; `readme` renders the README's
quick-start table and its command durations from that file, so no number there is typed by hand.

    python experiments/quickstart.py run       # every step not cached yet (~2 h on a shared 2-core CPU); resumable
    python experiments/quickstart.py show      # the two README blocks, printed
    python experiments/quickstart.py readme    # ... written into README.md between their markers

Steps (`steps`): `python train.py --help`; the quick start (before/after on 40 test examples per task); its adapter
on the whole test split (`eval.py`, 500 per task) and exported (`--export-peft`); cloze scoring of 100 ARC-Easy
examples (when the data is prepared); then the probe behind the README's "what it does not learn" (`PROBES`, one seed
each), scored on a held-out slice of the builtin *training* split (`held_out_file`: in neither pool nor test split).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` from a plain checkout
from experiments.grid import RESULTS, ROOT, WORK, machine, write_json  # noqa: E402
from experiments.reports import markdown, replace_block  # noqa: E402
from nanoalign.plumbing.system import read_json, write_atomic  # noqa: E402
from nanoalign.plumbing.tasks import BUILTIN_SIZES, BUILTIN_TASKS, builtin_examples  # noqa: E402

CACHE = RESULTS / "quickstart.json"
README = ROOT / "README.md"
HELD_OUT = 100  # per task, generated after the training pool
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PROBES = {  # name: (what the README calls it, train.py flags beyond the quick start's)
    "lr1e-3": ("lr 1e-3", ["--lr", "1e-3"]),
    "default": ("lr 2e-3 (the default)", []),
    "lr4e-3": ("lr 4e-3", ["--lr", "4e-3"]),
    "attention": ("lr 2e-3, attention too", ["--targets", ALL_LINEAR]),
    "longer": ("4× the examples (200 steps × 2 per task, lr 1e-3, all linear layers)",
               ["--max-steps", "200", "--batch-per-task", "2", "--lr", "1e-3", "--warmup", "20",
                "--targets", ALL_LINEAR]),
}


def held_out_file(path):
    """The held-out slice as a normalised JSONL file (rows of the builtin generator past its training pool)."""
    n = BUILTIN_SIZES["train"]
    rows = [ex for t in BUILTIN_TASKS for ex in builtin_examples(t, "train", n=n + HELD_OUT)[n:]]
    write_atomic(path, "".join(json.dumps(ex) + "\n" for ex in rows))
    return path


def timed(argv, output=False):
    """Run one command from the repository root as the README shows it; (seconds, load average before[, stdout]).
    With output, a failing command is measured too (the tests: their summary line says what failed)."""
    load = round(os.getloadavg()[0], 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOALIGN_")} if output else None  # a user's
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, check=not output, text=True, env=env,
                          stdout=subprocess.PIPE if output else subprocess.DEVNULL)
    return (round(time.perf_counter() - t0, 1), load) + ((done.stdout,) if output else ())


def summary(tasks):
    keep = ("n", "accuracy", "se", "majority_rate", "top_prediction", "top_share", "collapsed")
    return {t: {k: r[k] for k in keep} for t, r in tasks.items()}


def steps(work, data_dir):
    """[(name, function returning the step's record)], in the order they run; later steps use earlier outputs."""
    qs, out = work / "quickstart", str(work)

    def train(name, flags, evals=True):
        wall, load = timed(["train.py", "--out", out, "--run-name", name, "--overwrite", *flags,
                            *([] if evals else ["--eval-max", "0"])])
        log = [json.loads(line) for line in (work / name / "log.jsonl").read_text().splitlines()]
        rec = {"wall_s": wall, "load_before": load, "steps": len(log),
               "step_s": round(sum(r["ms"] for r in log) / len(log) / 1000, 2)}
        if evals:
            res = read_json(work / name / "results.json")
            rec.update(before=summary(res["before"]), after=summary(res["after"]))
        return rec

    def evaluate(name, flags):
        result = work / f"{name}.json"
        wall, load = timed(["eval.py", *flags, "--out", str(result), "--overwrite"])
        return {"wall_s": wall, "load_before": load, "tasks": summary(read_json(result)["tasks"])}

    def command(argv):
        return dict(zip(("wall_s", "load_before"), timed(argv)))

    def tests():
        wall, load, stdout = timed(["-m", "pytest", "-q", "tests"], output=True)
        return {"wall_s": wall, "load_before": load, "summary": stdout.strip().splitlines()[-1].strip("= ")}

    held = str(work / "held-out.jsonl")
    plan = [("help", partial(command, ["train.py", "--help"])), ("quickstart", partial(train, "quickstart", [])),
            ("eval500", partial(evaluate, "eval500", ["--adapter-dir", str(qs)])),
            ("export", partial(command, ["eval.py", "--adapter-dir", str(qs), "--export-peft", str(work / "peft"),
                                         "--overwrite"]))]
    if (Path(data_dir) / "commonsense" / "lm-eval" / "arc-easy-test.jsonl").exists():
        plan.append(("cloze100", partial(evaluate, "cloze100", ["--data", "arc-easy", "--mode", "cloze",
                                                                "--max-per-task", "100", "--data-dir", str(data_dir)])))
    for probe, (_, flags) in PROBES.items():
        if probe != "default":
            plan.append((f"train-{probe}", partial(train, f"probe-{probe}", flags, evals=False)))
        run_dir = qs if probe == "default" else work / f"probe-{probe}"
        plan.append((f"probe-{probe}", partial(evaluate, f"held-{probe}", ["--adapter-dir", str(run_dir), "--data",
                                                                           held, "--max-per-task", "0"])))
    return plan + [("tests", tests)]


def run(args):
    cache = read_json(CACHE) if CACHE.exists() else {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    held_out_file(work / "held-out.jsonl")
    for name, step in steps(work, args.data_dir):
        if name in cache and not args.again:
            continue
        print(f"quickstart: {name} ...", file=sys.stderr, flush=True)
        record = {**step(), "machine": machine()}
        cache = {**(read_json(CACHE) if CACHE.exists() else {}), name: record}  # what another run added meanwhile
        write_json(CACHE, cache)  # after every step: an interrupted run keeps what it measured
    print(f"wrote {CACHE}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the README blocks

def minutes(s):
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def where(rec):
    m = rec["machine"]
    return f"{m['cpu_count']}-core {m['cpu_capability']} CPU, load {rec['load_before']:g} when it started"


def learned(r):
    return not r["collapsed"] and r["accuracy"] - r["majority_rate"] > 2 * r["se"]


def verdict(r):
    if r["collapsed"]:
        return f"collapsed: \"{r['top_prediction']}\" on {100 * r['top_share']:.0f}%"
    gap = 100 * (r["accuracy"] - r["majority_rate"])
    if learned(r):
        return f"learned ({gap:+.1f} over the majority rate)"
    return f"not learned ({gap:+.1f} against the majority rate, within 2 SE)" if gap > 0 else \
        f"not learned ({gap:+.1f}: below the majority rate)"


def cell(r):
    return f"{100 * r['accuracy']:.1f} ± {100 * r['se']:.1f} ({100 * r['majority_rate']:.1f})"


def quickstart_block(c):
    if "quickstart" not in c:
        return "Not measured yet: `python experiments/quickstart.py run`."
    q = c["quickstart"]
    text = (f"`python train.py` took {minutes(q['wall_s'])} here ({where(q)}; commit {q['machine']['commit']}): "
            f"{q['steps']} steps at {q['step_s']:g} s a step, plus the evaluations before and after.\n\n")
    has500 = "eval500" in c
    header = ["task", "before, 40 (majority)", "after, 40 (majority)"] + (["after, 500 (majority)"] if has500 else [])
    rows = [[t, cell(q["before"][t]), cell(r)] + ([cell(c["eval500"]["tasks"][t])] if has500 else []) +
            [verdict(c["eval500"]["tasks"][t] if has500 else r)] for t, r in q["after"].items()]
    text += markdown(header + ["at the largest sample"], rows)
    probes = [(p, PROBES[p][0]) for p in PROBES if f"probe-{p}" in c]
    if probes:
        text += (f"\n\nThe probe, on {HELD_OUT} held-out examples per task (accuracy ± SE, majority rate in the first "
                 "column), one seed each:\n\n")
        tasks = list(c[f"probe-{probes[0][0]}"]["tasks"])
        head = ["task (majority)"] + [label for _, label in probes]
        prow = [[f"{t} ({100 * c[f'probe-{probes[0][0]}']['tasks'][t]['majority_rate']:.0f})"] +
                [f"{100 * (r := c[f'probe-{p}']['tasks'][t])['accuracy']:.0f} ± {100 * r['se']:.0f}" +
                 (f", \"{r['top_prediction']}\" {100 * r['top_share']:.0f}%" if r["collapsed"] else "")
                 for p, _ in probes] for t in tasks]
        runs = [c["quickstart" if p == "default" else f"train-{p}"] for p, _ in probes]
        text += markdown(head, prow + [["steps × s a step (load at the start)"] + [
            f"{r['steps']} × {r['step_s']:g} ({r['load_before']:g})" for r in runs]])
        text += "\n\nNot learned on the held-out slice (collapsed, or not 2 SE above its majority rate): " + "; ".join(
            f"{label}: {', '.join(t for t in tasks if not learned(c[f'probe-{p}']['tasks'][t])) or 'none'}"
            for p, label in probes) + "."
    missing = [p for p in PROBES if f"probe-{p}" not in c]
    if missing:
        text += f"\n\nNot measured yet: {', '.join(missing)} (`python experiments/quickstart.py run`)."
    return text


def durations_block(c):
    lines = []

    def item(key, what, extra=""):
        lines.append(f"- {what}: {minutes(c[key]['wall_s'])} (load {c[key]['load_before']:g}){extra};" if key in c
                     else f"- {what}: not measured yet;")

    item("help", "`--help`", " (importing torch)")
    if "quickstart" in c:
        q = c["quickstart"]
        item("quickstart", f"the quick start, {q['steps']} steps and two 40-per-task evaluations",
             f"; at its {q['step_s']:g} s a step, `lora-300`'s first 50 steps take about {minutes(50 * q['step_s'])} "
             f"and the remaining 250 about {minutes(250 * q['step_s'])}, and the other adapters' 100-step runs about "
             "as long as the quick start (their steps cost about a LoRA step: tutorial 07)")
    else:
        item("quickstart", "the quick start")
    item("eval500", "`eval.py --adapter-dir out/smollm2-135m-align-r8`, 500 generations per task")
    item("export", "`eval.py ... --export-peft`")
    if "cloze100" in c:
        s = c["cloze100"]["wall_s"]
        n = sum(r["n"] for r in c["cloze100"]["tasks"].values())
        lines.append(f"- `eval.py --data arc-easy --mode cloze --max-per-task {n}`: {minutes(s)} (load "
                     f"{c['cloze100']['load_before']:g}), model loading included: {n / s:.1f} examples a second;")
    item("tests", "`python -m pytest -q tests`", f": {c['tests']['summary']}" if "tests" in c else "")
    m = next((c[k]["machine"] for k in c), None)
    commits = sorted({c[k]["machine"]["commit"] for k in c})
    commits = ("commits " if len(commits) > 1 else "commit ") + ", ".join(commits)
    head = (f"Measured by `python experiments/quickstart.py run` on a {m['cpu_count']}-core {m['cpu_capability']} CPU at "
            f"{commits}, {m['date'][:10]}, while other jobs shared the cores (the load average when each "
            "command started is given; an idle machine is faster):\n\n") if m else ""
    return head + "\n".join(lines).rstrip(";") + "."


BLOCKS = {"quickstart": quickstart_block, "durations": durations_block}


def markers(name):
    return (f"<!-- generated by experiments/quickstart.py readme ({name}): begin -->",
            f"<!-- generated by experiments/quickstart.py readme ({name}): end -->")


def render_readme(text, cache):
    """README text with each block replaced by its rendering of `cache` (a ValueError if a marker is missing)."""
    for name, fn in BLOCKS.items():
        text = replace_block(text, fn(cache), *markers(name))
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["run", "show", "readme"])
    p.add_argument("--work", default=str(WORK / "quickstart"), help="scratch directory")
    p.add_argument("--data-dir", default=os.environ.get("NANOALIGN_DATA_DIR", str(ROOT / "data")))
    p.add_argument("--again", action="store_true", help="measure every step again")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(args)
    cache = read_json(CACHE) if CACHE.exists() else {}
    if args.command == "show":
        print("\n\n".join(fn(cache) for fn in BLOCKS.values()))
    else:
        write_atomic(README, render_readme(README.read_text(encoding="utf-8"), cache))
        print(f"wrote {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
