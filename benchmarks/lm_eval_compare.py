"""nanoalign's cloze scorer against lm-evaluation-harness (lm-eval) on the same files, model and machine.

`docs` writes each task's evaluation split from the original files in the schema of lm-eval's dataset, and each
task's yaml `include`s lm-eval's own, pointed at that file: every string comes from lm-eval's task code.

    python benchmarks/lm_eval_compare.py docs --out /tmp/lm-eval-docs                 # any Python, stdlib only
    $LMEVAL/bin/python benchmarks/lm_eval_compare.py strings --docs /tmp/lm-eval-docs \\
        --out tests/fixtures/lm_eval_strings.json                                       # the test fixture
    $LMEVAL/bin/python benchmarks/lm_eval_compare.py lm-eval --docs /tmp/lm-eval-docs --task piqa boolq \\
        --limit 50 --threads 1 --out benchmarks/lm_eval_runs                           # lm-eval's venv
    python benchmarks/lm_eval_compare.py ours --task piqa boolq --limit 50 --threads 1 \\
        --out benchmarks/lm_eval_runs                                                  # nanoalign's venv
    python benchmarks/lm_eval_compare.py table --out benchmarks/lm_eval_runs \\
        --speed benchmarks/lm_eval_runs/speed --write     # the RESULTS.md table (timings: --limit 300 runs)

$LMEVAL is a separate venv with lm-eval, transformers and peft. Both scorers load the same converted SmolLM2-135M
in fp32 on the CPU with the same batch size and threads; each run writes <out>/<tool>-<task>.json.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# lm-eval task -> (nanoalign task, lm-eval yaml under lm_eval/tasks/)
TASKS = {"piqa": ("piqa", "piqa/piqa.yaml"), "social_iqa": ("siqa", "siqa/siqa.yaml"),
         "winogrande": ("winogrande", "winogrande/default.yaml"), "arc_easy": ("arc-easy", "arc/arc_easy.yaml"),
         "arc_challenge": ("arc-challenge", "arc/arc_challenge.yaml"),
         "openbookqa": ("openbookqa", "openbookqa/openbookqa.yaml"),
         "boolq": ("boolq", "super_glue/boolq/default.yaml"), "sst2": ("sst2", "glue/sst2/default.yaml")}
# the code a run measures: read once, as the process imports it (HEAD may move while a long run goes on)
COMMIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
ORDER = ["sst2", "openbookqa", "arc_challenge", "winogrande", "piqa", "social_iqa", "arc_easy", "boolq"]  # small first


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def hf_docs(task, source=SHARED):
    """The split lm-eval scores, in its dataset's schema and file order (lm-eval's doc ids)."""
    c = Path(source) / "commonsense"

    def labelled(stem, key, kind=str):  # the rows of <stem>.jsonl, each with its label from <stem>-labels.lst
        gold = (c / f"{stem}-labels.lst").read_text(encoding="utf-8").split()
        return [{**r, key: kind(y)} for r, y in zip(jsonl(c / f"{stem}.jsonl"), gold)]

    if task == "piqa":  # baber/piqa: goal, sol1, sol2, label (int)
        return labelled("piqa/valid", "label", int)
    if task == "social_iqa":  # lighteval/siqa: context, question, answerA-C, label ("1".."3")
        return labelled("siqa/dev", "label")
    if task == "winogrande":  # winogrande_xl validation: sentence, option1, option2, answer ("1"/"2")
        return labelled("winogrande/dev", "answer")
    if task in ("arc_easy", "arc_challenge"):  # converted from allenai/ai2_arc: the schema as it is
        return jsonl(c / f"{task}/ai2_arc-test.jsonl")
    if task == "openbookqa":
        return jsonl(c / "openbookqa/openbookqa-test.jsonl")
    if task == "boolq":  # SuperGLUE's BoolQ: the passage is prefixed with its article's title
        return [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i,
                 "label": int(r["answer"])} for i, r in enumerate(jsonl(c / "boolq/dev.jsonl"))]
    if task == "sst2":  # GLUE tsv read as the HF glue builder did (tab-separated, no quoting, fields not stripped)
        lines = (Path(source) / "glue/sst2/dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
        return [{"sentence": s, "label": int(y), "idx": i} for i, (s, y) in enumerate(x.split("\t") for x in lines)]
    raise ValueError(task)


def ours_examples(task, fmt="lm-eval", source=SHARED):
    """nanoalign's examples of the same split, in the same order (BoolQ: the whole dev file)."""
    from nanoalign.plumbing import tasks as T
    name = TASKS[task][0]
    if name == "boolq":
        return T.parse_jsonl(T.task_dir(source, "boolq") / "dev.jsonl", partial(T.parse_boolq, fmt=fmt))
    return T.read_task(name, source, fmt=fmt)["test"]


def positions(task, n, tok, window):
    """(ours, theirs, ours with logits): token positions each tool runs through the decoder on the first n docs
    (padding not counted): lm-eval one forward of context + continuation[:-1] per choice, one per doc when the
    choices are one token after one context (its logits cache); ours one forward of each doc's shared prefix
    (fast.shared_prefixes) and one of each longer tail, with logits once per position that predicts a continuation
    token (a prefix position shared by several choices once)."""
    from nanoalign.data import choices_of
    from nanoalign.evaluate import encode_pair
    from nanoalign.plumbing.fast import shared_prefixes
    examples = ours_examples(task)[:n]
    theirs = 0
    for ex in examples:
        enc = [encode_pair(tok, context, continuation, joint=True) for context, continuation in choices_of(ex)[0]]
        one = len({tuple(c) for c, _ in enc}) == 1 and all(len(k) == 1 for _, k in enc)
        theirs += len(enc[0][0]) if one else sum(len(c) + len(k) - 1 for c, k in enc)
    units = shared_prefixes(tok, examples, window, joint=True, share_prefix=True)
    ours = sum(len(prefix) + sum(len(t) - 1 for _, t, _ in tails if len(t) > 1) for _, prefix, tails in units)
    logits = 0
    for _, prefix, tails in units:  # position k of prefix + tail predicts token k + 1; the last n are scored
        ends = [(len(prefix) + len(t) - n - 1, len(prefix) + len(t) - 1) for _, t, n in tails]
        logits += len({k for a, b in ends for k in range(a, min(b, len(prefix)))})
        logits += sum(b - max(a, len(prefix)) for a, b in ends if b > len(prefix))
    return ours, theirs, logits


def digest(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------

def write_docs(out, source):
    """<out>/<task>.jsonl (the docs) and <out>/yaml/<task>.yaml (lm-eval's yaml, pointed at them)."""
    out = Path(out).resolve()
    (out / "yaml").mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        (out / f"{task}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n"
                                                   for d in hf_docs(task, source)), encoding="utf-8")
    print(f"wrote {len(TASKS)} doc files into {out}")


def lm_eval_tasks(docs, names):
    """({name: lm-eval's task nanoalign_<name>}, the TaskManager holding them): for each task, lm-eval's own yaml
    reading the local docs."""
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict
    docs = Path(docs).resolve()
    yamls = docs / "yaml"
    yamls.mkdir(exist_ok=True)
    base = Path(lm_eval.__file__).parent / "tasks"
    for task, (_, rel) in TASKS.items():
        (yamls / f"{task}.yaml").write_text(
            f"include: {base / rel}\ntask: nanoalign_{task}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {docs / (task + '.jsonl')}\n"
            "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n")
    tm = TaskManager(include_path=str(yamls), include_defaults=False)
    got = get_task_dict([f"nanoalign_{t}" for t in names], tm)
    return {t: got[f"nanoalign_{t}"] for t in names}, tm


def cmd_strings(args):
    """lm-eval's (context, continuation) pairs: each split's digest, and the docs and pairs of the first `--keep`
    docs and of those whose fields carry outer whitespace."""
    import lm_eval
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tasks, _ = lm_eval_tasks(args.docs, list(TASKS))
    fixture = {"made_with": {"lm_eval": lm_eval.__version__, "command": " ".join(["benchmarks/lm_eval_compare.py",
                                                                                    *sys.argv[1:]]),
                             "date": time.strftime("%Y-%m-%d")},
               "tasks": {}}
    for name, task in tasks.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        by_doc = {}
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            by_doc.setdefault(inst.doc_id, []).append(list(inst.arguments))
        docs, hf = list(task.test_docs()), hf_docs(name)
        assert sorted(by_doc) == list(range(len(docs))), name
        strings = [by_doc[i] for i in range(len(docs))]
        gold = [gold_index(task, d) for d in docs]
        odd = [i for i, d in enumerate(hf) if any(isinstance(v, str) and v != v.strip() for v in flat(d))]
        keep = sorted(set(range(min(args.keep, len(docs)))) | set(odd[:args.keep]))
        fixture["tasks"][name] = {"n": len(docs), "sha256": digest({"pairs": strings, "gold": gold}),
                                  "examples": [{"doc_id": i, "doc": hf[i], "pairs": strings[i], "gold": gold[i]}
                                               for i in keep]}
        print(f"{name}: {len(docs)} docs, {len(keep)} kept")
    Path(args.out).write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


def gold_index(task, doc):
    """The index of the correct choice as lm-eval's process_results finds it (WinoGrande: doc_to_text's index)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        gold = choices.index(gold) if gold in choices else int(gold)
    return gold


def flat(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from (x for vs in v.values() for x in (vs if isinstance(vs, list) else [vs]))
        else:
            yield v


# ---------------------------------------------------------------------------------------------------------- scoring

def cmd_lm_eval(args):
    """lm-eval's HF model (`--model hf`) on each task: per doc, its log-likelihoods, acc and acc_norm."""
    import lm_eval
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    lm = HFLM(pretrained=str(args.model), dtype="float32", device="cpu", batch_size=args.batch_size)
    for name in args.task:
        tasks, tm = lm_eval_tasks(args.docs, [name])
        t0, c0 = time.perf_counter(), time.process_time()
        res = simple_evaluate(model=lm, tasks=[f"nanoalign_{name}"], task_manager=tm, log_samples=True,
                              batch_size=args.batch_size, limit=args.limit)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        samples, task = sorted(res["samples"][f"nanoalign_{name}"], key=lambda s: s["doc_id"]), tasks[name]
        write_run(args, name, "lm-eval", f"lm-eval {lm_eval.__version__} (HFLM, transformers)", seconds, cpu,
                  [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                  [gold_index(task, s["doc"]) for s in samples],
                  [[float(len(c)) for c in task.doc_to_choice(s["doc"])] for s in samples],
                  reported=res["results"][f"nanoalign_{name}"])


def cmd_ours(args):
    """nanoalign's evaluate(mode="cloze") on the lm-eval format of the same split."""
    import torch
    import nanoalign.plumbing as P
    from nanoalign.data import choices_of
    from nanoalign.evaluate import char_length, evaluate
    from nanoalign.plumbing import fast
    torch.set_num_threads(args.threads)
    tok = P.load_tokenizer(str(args.model))
    model = P.load_model(str(args.model), dtype=torch.float32, device="cpu")
    by_length = "" if args.plain else " with by_length=True"
    what = f"nanoalign evaluate(mode='cloze', scorer=fast.choice_logprobs{by_length})"
    for task in args.task:
        examples = [{**ex, "index": i} for i, ex in enumerate(ours_examples(task))][:args.limit]
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluate(model, tok, {task: examples}, mode="cloze", batch_size=args.batch_size,
                       scorer=partial(fast.choice_logprobs, by_length=not args.plain))[task]
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_run(args, task, "ours-plain" if args.plain else "ours", what, seconds, cpu,
                  [r["scores"] for r in res["records"]], [choices_of(ex)[1] for ex in examples],
                  [[float(char_length(ex, c)) for c in range(len(choices_of(ex)[0]))] for ex in examples],
                  reported={"acc": res["accuracy"], "acc_norm": res["acc_norm"]})


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def write_run(args, task, tool, what, seconds, cpu, scores, gold, lengths, reported):
    """<out>/<tool>-<task>.json. seconds: wall time; cpu: the process's CPU time, which other jobs disturb far less."""
    pred = [argmax(s) for s in scores]
    pred_norm = [argmax([v / max(n, 1) for v, n in zip(s, ls)]) for s, ls in zip(scores, lengths)]
    n = len(scores)
    run = {"tool": tool, "what": what, "task": task, "n": n, "seconds": seconds, "examples_per_s": n / seconds,
           "cpu_seconds": cpu, "examples_per_cpu_s": n / cpu,
           "batch_size": args.batch_size, "threads": args.threads,
           "acc": sum(p == g for p, g in zip(pred, gold)) / n,
           "acc_norm": sum(p == g for p, g in zip(pred_norm, gold)) / n, "reported": reported,
           "gold": gold, "pred": pred, "pred_norm": pred_norm, "scores": scores,
           "cpu": os.uname().machine, "load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "commit": COMMIT}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tool}-{task}.json").write_text(json.dumps(run) + "\n")
    print(f"{tool} {task}: n={n} acc={run['acc']:.4f} acc_norm={run['acc_norm']:.4f} "
          f"{seconds:.1f} s ({run['examples_per_s']:.2f} examples/s), {cpu:.1f} CPU s "
          f"({run['examples_per_cpu_s']:.2f} examples/CPU s)")


BEGIN, END = "<!-- lm_eval_compare.py table: begin -->", "<!-- lm_eval_compare.py table: end -->"


def load_pair(out, task):
    a, b = Path(out) / f"ours-{task}.json", Path(out) / f"lm-eval-{task}.json"
    if not (a.exists() and b.exists()):
        return None
    a, b = json.loads(a.read_text()), json.loads(b.read_text())
    assert a["n"] == b["n"] and a["gold"] == b["gold"], task
    return a, b


def cmd_table(args):
    """The markdown table of every task with both runs in --out (scores) and --speed (timings, default --out);
    --write puts it into benchmarks/RESULTS.md."""
    lines = ["| task | docs scored (split) | acc ours / lm-eval | acc_norm ours / lm-eval | agree (acc) "
             "| agree (acc_norm) | max abs. Δ log-lik | docs timed | examples/CPU-s ours / lm-eval | speed-up (CPU) "
             "| examples/s (wall) ours / lm-eval | decoder positions ours / lm-eval |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    import torch
    import nanoalign.plumbing as P
    from nanoalign.model import CausalLM, ModelConfig
    from nanoalign.plumbing import system
    model = Path(default_model())
    tok = P.load_tokenizer(str(model))
    with torch.device("meta"):  # FLOPs per position by the MFU convention (system.py), no weights loaded
        shape = CausalLM(ModelConfig.from_json(model / "config.json"))
    decoder, _, head = system.flops_coefficients(shape, train=False)
    window = shape.config.max_position_embeddings  # evaluate's cut
    runs, timed, work = [], [], {}
    for task in ORDER:
        pair, speed = load_pair(args.out, task), load_pair(args.speed or args.out, task)
        if not (pair and speed):
            lines.append(f"| {task} | not run |" + " |" * 10)
            continue
        (a, b), (sa, sb) = pair, speed
        runs += [a, b]
        timed += [sa, sb]
        n, split = a["n"], len(hf_docs(task))
        agree = sum(x == y for x, y in zip(a["pred"], b["pred"]))
        agree_norm = sum(x == y for x, y in zip(a["pred_norm"], b["pred_norm"]))
        delta = max(abs(x - y) for s, t in zip(a["scores"], b["scores"]) for x, y in zip(s, t))
        scored = f"{n} (all)" if n == split else f"first {n} of {split}"
        ours, theirs, logits = positions(task, sa["n"], tok, window)
        work[task] = theirs * (decoder + head) / (ours * decoder + logits * head)  # lm-eval: logits everywhere
        lines.append(f"| {task} | {scored} | {100 * a['acc']:.2f} / {100 * b['acc']:.2f} | "
                     f"{100 * a['acc_norm']:.2f} / {100 * b['acc_norm']:.2f} | {agree}/{n} | {agree_norm}/{n} | "
                     f"{delta:.1e} | {'all' if sa['n'] == split else 'first ' + str(sa['n'])} | "
                     f"{sa['examples_per_cpu_s']:.2f} / {sb['examples_per_cpu_s']:.2f} | "
                     f"{sa['examples_per_cpu_s'] / sb['examples_per_cpu_s']:.2f}× | "
                     f"{sa['examples_per_s']:.2f} / {sb['examples_per_s']:.2f} | "
                     f"{ours:,} / {theirs:,} ({theirs / ours:.2f}×) |")
    tasks = [r["task"] for r in runs[::2]]
    equal = [t for t, a, b in zip(tasks, runs[::2], runs[1::2])
             if (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])]
    fast = [t for t, a, b in zip(tasks, timed[::2], timed[1::2])
            if a["examples_per_cpu_s"] >= 1.5 * b["examples_per_cpu_s"]]
    lines += ["", f"Targets: equal acc and acc_norm on {len(equal)} of {len(tasks)} tasks"
              + (f" (not {', '.join(t for t in tasks if t not in equal)})" if len(equal) < len(tasks) else "")
              + f"; ours >= 1.5x lm-eval's examples/CPU-s on {len(fast)} of {len(tasks)}"
              + (f" (not {', '.join(t for t in tasks if t not in fast)})" if len(fast) < len(tasks) else "") + "."
              + "".join(f" {t}: lm-eval's linear layers do {work[t]:.2f}× our multiply-adds on these documents (its"
                        " positions, logits at each; ours, logits only where scored), so 1.5× would need a faster"
                        " forward of the same matmuls (torch's on both sides)." for t in tasks
                        if t not in fast and work[t] < 1.5)]
    table = "\n".join(lines)
    print(table)
    if not args.write:
        return

    def when(rs):
        dates, loads = sorted(r["date"] for r in rs), [r["load_before"][0] for r in rs]
        return (f"{dates[0]} to {dates[-1]} UTC, 1-minute load average before each run {min(loads):.1f} to "
                f"{max(loads):.1f}")
    what = sorted({r["what"] for r in runs + timed})
    command = f"python benchmarks/lm_eval_compare.py table --out {args.out}" + (
        f" --speed {args.speed}" if args.speed else "") + " --write"
    body = (f"{BEGIN}\nGenerated by `{command}` from the runs {when(runs)}"
            + (f" (scores) and {when(timed)} (timings)" if args.speed else "")
            + f" ({', '.join(what)}); batch size {sorted({r['batch_size'] for r in runs + timed})}, threads "
            f"{sorted({r['threads'] for r in runs + timed})}, fp32 on the CPU ({runs[0]['cpu']}).\n\n{table}\n{END}")
    path = ROOT / "benchmarks/RESULTS.md"
    text = path.read_text(encoding="utf-8")
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Cloze scoring: nanoalign vs lm-evaluation-harness\n\n" + body + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("docs", help="write the docs lm-eval reads")
    d.add_argument("--out", required=True)
    d.add_argument("--source", default=str(SHARED))
    s = sub.add_parser("strings", help="lm-eval's strings -> the test fixture (lm-eval's venv)")
    s.add_argument("--docs", required=True)
    s.add_argument("--out", default=str(ROOT / "tests/fixtures/lm_eval_strings.json"))
    s.add_argument("--keep", type=int, default=20, help="docs kept whole per task (plus as many with odd spaces)")
    for name in ("lm-eval", "ours"):
        r = sub.add_parser(name, help=f"score one task with {name}")
        r.add_argument("--task", required=True, nargs="+", choices=list(TASKS), help="one or more (one model load)")
        r.add_argument("--out", required=True)
        r.add_argument("--batch-size", type=int, default=32)
        r.add_argument("--threads", type=int, default=2)
        r.add_argument("--model", default=None, help="HF model directory (default: the converted SmolLM2-135M)")
        r.add_argument("--limit", type=int, default=None, help="only the first N docs of the split (the table says so)")
        if name == "lm-eval":
            r.add_argument("--docs", required=True)
        else:
            r.add_argument("--plain", action="store_true", help="evaluate's default batching (by_length off)")
    t = sub.add_parser("table", help="markdown rows from the runs in --out")
    t.add_argument("--out", required=True)
    t.add_argument("--speed", default=None, help="the timings from the runs in this folder (default: --out)")
    t.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.cmd == "docs":
        return write_docs(args.out, args.source)
    if args.cmd in ("lm-eval", "ours") and args.model is None:
        args.model = default_model()
    {"strings": cmd_strings, "lm-eval": cmd_lm_eval, "ours": cmd_ours, "table": cmd_table}[args.cmd](args)


def default_model():
    """The converted SmolLM2-135M-Instruct directory (lm-eval's venv only reads it; nanoalign converts it)."""
    d = Path(os.environ.get("NANOALIGN_CACHE", Path.home() / ".cache" / "nanoalign")) / "smollm2-135m-instruct-q4_1"
    if (d / "model.safetensors").exists():
        return d
    from nanoalign.plumbing.embedded import ensure_smollm2
    return ensure_smollm2()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
