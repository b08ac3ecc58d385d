"""Task screening: which tasks can a plain LoRA on SmolLM2-135M learn at a small budget, in which prompt format?

Per task and prompt format: the base model, the majority rate and a plain LoRA trained on all tasks of the format.
A task qualifies when LoRA beats both by >= 5 points, stays below 95% and does not collapse (`qualifies`).

    python experiments/screening.py            # trains what is not cached yet (experiments/grid.py), then the table
    python experiments/screening.py --table    # re-render experiments/screening.{json,md} from the cached runs
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` from a plain checkout
from experiments.grid import RESULTS, ROOT, Grid, Method, Suite, write_json  # noqa: E402

from experiments.stats import paired_bootstrap  # noqa: E402

CHOICE_TASKS = ("sst2", "cola", "mrpc", "rte", "qnli", "boolq", "piqa", "siqa", "arc-easy", "arc-challenge",
                "openbookqa", "winogrande")
BUILTIN = ("alphabet-first", "colour-review", "flipped-animal", "larger-number", "last-letter")
BUDGET = dict(steps=200, batch_per_task=2, lr=1e-3, warmup=20, seq_len=256)
LORA = {"lora-r8": Method({"adapter": "lora", "rank": 8})}
TEST = 300  # test examples per task: SE of an accuracy near 50% ~2.9 points


def grids():
    """The screening grids, in the order they run."""
    return [
        Grid("screen-label", Suite(CHOICE_TASKS, fmt="label", mode="loglik", test_per_task=TEST, **BUDGET), LORA, [0]),
        # cloze answers are the option texts: some PIQA solutions are over 200 tokens
        Grid("screen-cloze", Suite(CHOICE_TASKS, fmt="cloze", mode="cloze", test_per_task=TEST,
                                   **{**BUDGET, "seq_len": 640}), LORA, [0]),
        Grid("screen-builtin", Suite(BUILTIN, fmt="label", mode="loglik", test_per_task=TEST, **BUDGET), LORA, [0]),
        # GSM8K answers are worked solutions: scored by generation (256 new tokens) and the final number
        *(Grid(f"screen-gsm8k-{fmt}", Suite(("gsm8k",), fmt=fmt, mode="generate", test_per_task=200,
                                            **{**BUDGET, "batch_per_task": 4, "seq_len": 384}), LORA, [0])
          for fmt in ("label", "cloze")),
    ]


def qualifies(base, lora):
    """The screening rule on one task's diagnostics (accuracies as fractions)."""
    return (lora["accuracy"] - base["accuracy"] >= 0.05 and lora["accuracy"] - lora["majority_rate"] >= 0.05
            and lora["accuracy"] < 0.95 and not lora["collapsed"])


def rows_of(g):
    res = g.results()
    base, runs = res["base"], res["lora-r8"]
    if base is None:
        return []
    out = []
    for t, b in base["tasks"].items():
        row = {"task": t, "format": g.suite.fmt, "mode": g.suite.mode, "n": b["n"], "majority": b["majority_rate"],
               "base": b["accuracy"], "base_top": b["top_share"], "base_collapsed": b["collapsed"],
               "base_predicted": b["predicted"]}
        if runs:
            r = runs[0]["tasks"][t]
            boot = paired_bootstrap({t: [runs[0]["predictions"][t]["correct"]]},
                                    {t: [base["predictions"][t]["correct"]]}, n_boot=4000)
            row.update(lora=r["accuracy"], lora_top=r["top_share"], lora_collapsed=r["collapsed"],
                       lora_predicted=r["predicted"], lift=r["accuracy"] - b["accuracy"],
                       lift_low=boot["low"], lift_high=boot["high"], qualifies=qualifies(b, r))
            if "acc_norm" in r:
                row.update(base_acc_norm=b.get("acc_norm"), lora_acc_norm=r["acc_norm"])
        out.append(row)
    return out


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(rows, meta):
    lines = ["| task | format | n | majority | base (top share) | LoRA (top share) | LoRA − base [95% CI] | "
             "qualifies |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["format"])):
        base = f"{pct(r['base'])} ({pct(r['base_top'])}{', collapsed' if r['base_collapsed'] else ''})"
        if "lora" in r:
            lora = f"{pct(r['lora'])} ({pct(r['lora_top'])}{', collapsed' if r['lora_collapsed'] else ''})"
            lift = f"{100 * r['lift']:+.1f} [{100 * r['lift_low']:+.1f}, {100 * r['lift_high']:+.1f}]"
            q = "**yes**" if r["qualifies"] else "no"
        else:
            lora, lift, q = "not run yet", "", ""
        lines.append(f"| {r['task']} | {r['format']} | {r['n']} | {pct(r['majority'])} | {base} | {lora} | {lift} | "
                     f"{q} |")
    head = (f"Task screening on {meta['model']}: base model vs a plain LoRA (rank 8 on gate/up/down, {meta['budget']}"
            f") trained on all tasks of a format together, seed 0. Accuracies in %, scored by option log-likelihood "
            f"(label format) or lm-evaluation-harness acc (cloze), GSM8K by generation; 'top share' is the share of "
            f"the most frequent prediction (collapsed > 90%). Generated by `python experiments/screening.py "
            f"--table` from experiments/results/runs/.\n\n")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", action="store_true", help="only re-render the table from cached runs")
    p.add_argument("--only", default="", help="comma list of grid names to run (default: all)")
    args = p.parse_args(argv)
    t0 = time.time()
    for g in grids():
        if not args.table and (not args.only or g.name in args.only.split(",")):
            g.run()
    rows = [r for g in grids() for r in rows_of(g)]
    runs = [r for g in grids() for rs in g.results().values() if rs for r in (rs if isinstance(rs, list) else [rs])]
    meta = {"model": "smollm2-135m", "budget": ", ".join(f"{k} {v}" for k, v in BUDGET.items()),
            "command": "python experiments/screening.py",
            "runs": [{"grid": r.get("grid"), "label": r["label"], "key": r["key"], "machine": r["machine"],
                      "wall_s": r["wall_s"]} for r in runs],
            "rule": "LoRA - base >= 5 points, LoRA - majority >= 5 points, LoRA < 95%, LoRA not collapsed"}
    write_json(ROOT / "experiments" / "screening.json", {"meta": meta, "rows": rows})
    (ROOT / "experiments" / "screening.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    print(f"({time.time() - t0:.0f} s; results in {RESULTS / 'runs'})")


if __name__ == "__main__":
    main()
