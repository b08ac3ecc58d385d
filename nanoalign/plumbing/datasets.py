"""Dataset loading around nanoalign/data.py: `load_tasks` turns a --data spec (a suite, a comma list of tasks, or a
.jsonl file of normalised examples, data/README.md) into examples by task, each file checked row by row; JSONL I/O.
"""

import json
import os
import sys
from pathlib import Path

from .system import write_atomic
from .tasks import LABEL_ONLY, SUITES, TASK_SUITE, builtin_examples, check_format, read_json_lines, subsample


def check_example(ex):
    """The problem with one normalised example as a short phrase, or None when it is well-formed."""
    if not isinstance(ex, dict):
        return f"expected a JSON object, got {type(ex).__name__}"
    for key in ("task", "prompt", "answer"):
        if key not in ex:
            return f"missing key {key!r}"
        if not isinstance(ex[key], str) or not ex[key].strip():
            return f"{key!r} must be a non-empty string"
    if "options" in ex and "contexts" in ex:
        return "an example has 'options' (one context, several continuations) or 'contexts' (several contexts, one "\
               "continuation), not both"
    key, gold_is = ("contexts", "prompt") if "contexts" in ex else ("options", "answer")
    choices = ex.get(key)
    if choices is not None and not (isinstance(choices, list) and len(choices) >= 2
                                    and all(isinstance(o, str) and o.strip() for o in choices)):
        return f"{key!r} must be a list of at least 2 non-empty strings"
    if "gold" in ex:
        gold = ex["gold"]
        if choices is None or not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            return f"'gold' must be the index of the correct one of the {key}"
        if choices[gold] != ex[gold_is]:
            return f"'gold' {gold} does not point at the {gold_is}"
    elif key == "contexts":
        return "an example with 'contexts' needs 'gold', the index of the correct context"
    elif choices is not None and ex["answer"] not in choices:
        return f"answer {ex['answer']!r} is not one of the options {choices}"
    return None


def read_jsonl(path):
    """Normalised examples of a JSONL file; a bad line or example is a ValueError naming the file and line."""
    rows = []
    for i, ex in read_json_lines(path):
        if problem := check_example(ex):
            raise ValueError(f"{path}:{i}: {problem}")
        rows.append(ex)
    return rows


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in rows))


def prepare_hint(suite, task=None, split="train"):
    tasks = f" --tasks {task}" if task else ""
    dev = " (the dev split: see data/README.md for the tasks that have one)" if split == "dev" else ""
    return f"run `python data/prepare.py {suite} --source DIR{tasks}` first{dev}"


def data_file(data_dir, task, split, fmt="label"):
    """Where data/prepare.py writes a task's split: <data_dir>/<suite>[/<fmt> unless label]/<task>-<split>.jsonl."""
    suite_dir = Path(data_dir) / TASK_SUITE[task]
    return (suite_dir if fmt == "label" else suite_dir / fmt) / f"{task}-{split}.jsonl"


def load_tasks(spec="builtin", split="train", data_dir="data", max_per_task=None, seed=0, fmt="label"):
    """{task: examples} (sorted: the task-id order) of a suite, a comma list of tasks or a JSONL file (data/README.md);
    max_per_task: a seeded random subsample in file order (None or 0: all). Examples get their "index"."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', got {split!r}")
    check_format(fmt)
    data_dir = Path(data_dir)
    by_task = {}
    if spec.endswith(".jsonl") or os.sep in spec:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (spec is a path to a JSONL file of normalised examples)")
        for ex in read_jsonl(path):
            by_task.setdefault(ex["task"], []).append(ex)
        if not by_task:
            raise ValueError(f"{path} holds no examples")
    else:
        suite = spec if spec in SUITES else None  # a whole suite: its tasks without prepared data are left out
        names = SUITES[spec] if suite else [t.strip() for t in spec.split(",") if t.strip()]
        unknown = [t for t in names if t not in TASK_SUITE]
        if unknown or not names:
            raise ValueError(f"unknown task {', '.join(unknown) or repr(spec)}: give a suite ({', '.join(SUITES)}), "
                             f"a comma list of task names, or a path to a .jsonl file")
        missing = []
        for t in names:
            what = f"the {suite} suite" if suite else t
            if fmt != "label" and TASK_SUITE[t] in LABEL_ONLY:
                raise ValueError(f"{what} has the label format only; use fmt='label'")
            if TASK_SUITE[t] == "bbh" and split == "train":
                raise ValueError(f"{what} is evaluation-only (BBH's files carry a do-not-train canary); use "
                                 "split='test'")
            path = data_file(data_dir, t, split, fmt)
            if TASK_SUITE[t] == "builtin":
                by_task[t] = builtin_examples(t, split)
            elif path.exists():
                by_task[t] = read_jsonl(path)
            elif suite:
                missing.append(t)
            else:
                raise FileNotFoundError(f"{path} not found: {prepare_hint(TASK_SUITE[t], t, split)}")
        if suite and not by_task:
            raise FileNotFoundError(f"no prepared {spec} {fmt}-format {split} data in {data_dir / spec}: "
                                    f"{prepare_hint(spec, split=split)}")
        if missing:
            print(f"note: {spec} tasks without prepared {split} data are left out: {', '.join(missing)}",
                  file=sys.stderr)
    for t, rows in by_task.items():
        if not rows:
            raise ValueError(f"task {t!r} has no {split} examples")
        wrong = next((ex["task"] for ex in rows if ex["task"] != t), None)
        if wrong is not None:
            raise ValueError(f"file for task {t!r} holds a row of task {wrong!r}")
    indexed = {t: [{**ex, "index": i} for i, ex in enumerate(rows)] for t, rows in by_task.items()}
    return {t: subsample(indexed[t], max_per_task or None, seed=seed, salt=t) for t in sorted(indexed)}


def select_tasks(by_task, subset, spec):
    """Keep the --tasks subset of what --data loaded (sorted); an unknown name is an error."""
    if not subset:
        return by_task
    unknown = [t for t in subset if t not in by_task]
    if unknown:
        raise ValueError(f"--tasks {', '.join(unknown)}: not among the tasks of --data {spec} ({', '.join(by_task)})")
    return {t: by_task[t] for t in sorted(subset)}
