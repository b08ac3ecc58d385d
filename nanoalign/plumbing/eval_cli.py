"""eval.py's command line: flags, the adapter directory and its checks, --export-peft, the result files (never an
existing one without --overwrite) and the one-line errors. The evaluation itself is eval.py's `fold` and `score`."""

import argparse
import importlib
import json
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch

from . import fast, load_model, load_tokenizer
from .adapter_io import export_peft_dirs, load_adapter
from ..evaluate import MODES, accuracies, diagnostics_table, generation_fallback, without_records
from .datasets import load_tasks, select_tasks
from .hub import HubError
from .system import base_dtype, error_line, pick_device, read_json, write_atomic
from .scoring import progress_bar
from .tasks import FORMATS


def parse_args(argv, eval_py):
    p = argparse.ArgumentParser(description=eval_py.__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="alias, directory or HF repo id (default: the adapter's base "
                                                 "model, else smollm2-135m)")
    p.add_argument("--adapter-dir", default=None, help="adapter directory written by train.py (out/<run>/adapter; "
                                                       "the run directory out/<run> works too)")
    p.add_argument("--data", default="builtin", help="suite, comma list of tasks, or a normalised .jsonl file")
    p.add_argument("--tasks", default="", help="subset of the tasks of --data, comma separated")
    p.add_argument("--data-dir", default="data", help="where data/prepare.py wrote <suite>/<task>-<split>.jsonl")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--max-per-task", type=int, default=500, help="examples per task, a random subsample in file "
                   "order (0: the whole split in file order)")
    p.add_argument("--mode", choices=MODES, default="generate", help="generate: greedy decoding + answer extraction "
                   "(the paper); loglik: option log-likelihood; cloze: lm-evaluation-harness's acc / acc_norm")
    p.add_argument("--format", choices=FORMATS, default=None, help="prompt format of the tasks (default: lm-eval with "
                   "--mode cloze, else label)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16, help="generate mode: tokens per answer")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337, help="seed of the per-task subsample")
    p.add_argument("--no-merge", action="store_true", help="keep a mergeable adapter unmerged")
    p.add_argument("--out", default=None, help="results file (default: <run>/eval/<data>-<split>-<format>-<mode>-n<N>"
                   ".json, or out/eval/<model>/... for a base model); predictions go beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result of the same evaluation (or "
                   "an existing --export-peft directory)")
    p.add_argument("--export-peft", default=None, metavar="DIR", help="write the adapter of --adapter-dir as PEFT "
                   "LoRA (MTL-LoRA: DIR/<task> per training task) and exit without evaluating")
    return p.parse_args(argv)


def result_paths(args, adapter_dir, model_name, fmt):
    """(results JSON, predictions JSONL) for this evaluation; never an existing one unless --overwrite."""
    safe = lambda name: re.sub(r"[^\w.,-]+", "_", name)  # noqa: E731
    if args.out:
        out = Path(args.out)
    else:
        root = (adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir) / "eval" if adapter_dir else \
            Path("out") / "eval" / safe(Path(model_name).name)
        data = Path(args.data).stem if args.data.endswith(".jsonl") else args.data
        out = root / f"{safe(data)}-{args.split}-{fmt}-{args.mode}-n{args.max_per_task or 'all'}.json"
    preds = out.with_name(out.stem + ".predictions.jsonl")
    if not args.overwrite and (out.exists() or preds.exists()):
        raise FileExistsError(f"{out if out.exists() else preds} exists (an earlier evaluation); pass --overwrite to "
                              "replace it or --out FILE to write elsewhere")
    return out, preds


def find_adapter_dir(path):
    """The adapter directory itself, or the `adapter/` inside a run directory."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"--adapter-dir {d}: no such directory")
    if not (d / "adapter_config.json").is_file() and (d / "adapter" / "adapter_config.json").is_file():
        d = d / "adapter"
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter-dir {d}: no adapter_config.json; pass the adapter/ directory train.py "
                                "wrote (out/<run>/adapter)")
    if read_json(d / "adapter_config.json").get("format") != "nanoalign-adapter":
        raise ValueError(f"--adapter-dir {d}: not a nanoalign adapter (a PEFT directory? evaluate the adapter/ "
                         "directory next to it)")
    return d


def export(args, adapter_dir, model_name, task_names):
    """--export-peft: the adapter's PEFT LoRA directories under args.export_peft; nothing else is run."""
    if adapter_dir is None:
        raise ValueError("--export-peft needs --adapter-dir (the adapter to export)")
    if not args.export_peft.strip():
        raise ValueError("--export-peft '': name the directory to write the PEFT LoRA to")
    out = Path(args.export_peft)
    if out.resolve() in (adapter_dir.resolve(), *adapter_dir.resolve().parents):
        raise ValueError(f"--export-peft {out} holds the adapter being exported ({adapter_dir}); writing there "
                         "would replace its files: choose another directory (e.g. <run>/peft)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"--export-peft {out} exists and is not empty; pass --overwrite to write into it or "
                              "choose another directory")
    model = load_model(model_name, dtype=torch.float32, device="cpu")  # exported in fp32 either way
    load_adapter(model, adapter_dir)
    written = export_peft_dirs(model, out, task_names, base_model_name_or_path=model_name)
    print(f"wrote {written}")
    return {"exported": written}


def run(args, eval_py):
    if args.max_per_task < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--max-per-task must be >= 0, --batch-size and --max-new-tokens >= 1")
    device = pick_device(args.device)
    adapter_dir = find_adapter_dir(args.adapter_dir) if args.adapter_dir else None
    saved = read_json(adapter_dir / "adapter_config.json") if adapter_dir else {}
    model_name = args.model or saved.get("base_model") or "smollm2-135m"
    task_ids, names = None, None
    if adapter_dir and (adapter_dir / "tasks.json").is_file():  # training task ids (MTL-LoRA needs them at inference)
        names = read_json(adapter_dir / "tasks.json").get("tasks")
        if not isinstance(names, list) or not all(isinstance(t, str) for t in names):
            raise ValueError(f"{adapter_dir / 'tasks.json'}: expected {{\"tasks\": [task names]}}")
        task_ids = {t: i for i, t in enumerate(names)}
    if args.export_peft is not None:
        return export(args, adapter_dir, model_name, names)
    fmt = args.format or ("lm-eval" if args.mode == "cloze" else "label")
    out, preds_path = result_paths(args, adapter_dir, model_name, fmt)  # before any work: refuse to overwrite

    tasks = load_tasks(args.data, args.split, data_dir=args.data_dir, max_per_task=args.max_per_task or None,
                       seed=args.seed, fmt=fmt)
    tasks = select_tasks(tasks, [t.strip() for t in args.tasks.split(",") if t.strip()], args.data)
    tok = load_tokenizer(model_name)
    model = load_model(model_name, dtype=base_dtype(device, args.dtype), device=device)
    if adapter_dir:
        load_adapter(model, adapter_dir)  # a damaged file is one ValueError naming it
    label = eval_py.fold(model, merge=not args.no_merge)
    if fallback := generation_fallback(tasks, args.mode):
        print(f"note: --mode {args.mode} scores options; {', '.join(fallback)} (no options) will be scored by "
              "generation instead (its result says mode 'generate')", file=sys.stderr)
    results, seconds = eval_py.score(model, tok, tasks, mode=args.mode, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, task_ids=task_ids,
                                     progress=progress_bar("eval"),
                                     scorer=partial(fast.choice_logprobs, by_length=True))
    acc = accuracies(results)
    n = sum(len(v) for v in tasks.values())
    print(diagnostics_table(results, title=f"{model_name} + {adapter_dir or 'no adapter'} ({label}): {args.mode}, "
                            f"{fmt} format, {args.split} split; {n} examples in {seconds:.0f} s "
                            f"({n / max(seconds, 1e-9):.1f} examples/s)"))
    result = {"model": model_name, "adapter_dir": str(adapter_dir) if adapter_dir else None, "adapter": label,
              "mode": args.mode, "format": fmt, "split": args.split, "data": args.data,
              "max_per_task": args.max_per_task, "sample_seed": args.seed,
              "examples": {t: len(v) for t, v in tasks.items()}, "accuracy": acc,
              "average": sum(acc.values()) / len(acc), "tasks": without_records(results),
              "seconds": round(seconds, 1), "command": " ".join(["eval.py", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(preds_path, "".join(json.dumps(rounded(r)) + "\n" for res in results.values() for r in res["records"]))
    write_atomic(out, json.dumps(result, indent=2))
    print(f"wrote {out} and {preds_path.name}")
    return result


def rounded(record):
    """A per-example record with its scores rounded to 4 decimals (enough to rank options, a third of the bytes)."""
    return {k: [round(x, 4) for x in v] if k == "scores" else v for k, v in record.items()}


def main(argv=None, eval_py=None):
    """`python eval.py ...`; a bad input, a full disk or an interrupt ends in one `error:` line."""
    eval_py = eval_py or importlib.import_module("eval")
    args = parse_args(argv, eval_py)
    try:
        return run(args, eval_py)
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, HubError, torch.OutOfMemoryError) as e:
        print(f"error: {error_line(e, '--batch-size')}", file=sys.stderr)
        sys.exit(1)
