"""Per-task accuracy of a base model, or of a base model plus a trained adapter.

    python eval.py                                             # smollm2-135m on the builtin suite's test split
    python eval.py --adapter-dir out/smollm2-135m-align-r8/adapter --data builtin
    python eval.py --model qwen2.5-0.5b --data commonsense --mode loglik --max-per-task 500

Scoring follows the paper (METHODS §5.1): greedy generation and answer extraction (`--mode generate`), or option
log-likelihood for tasks with a fixed option set (`--mode loglik`). Mergeable adapters are folded into the base
weights first, so evaluation runs at base-model speed. Prints a markdown table and writes `results.json`.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import nanoalign
from nanoalign.evaluate import evaluate, markdown_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="alias, directory or HF repo id (default: the adapter's base, "
                                                 "else smollm2-135m)")
    p.add_argument("--adapter-dir", default=None, help="a nanoalign adapter directory written by train.py")
    p.add_argument("--data", default="builtin", help="suite, comma list of tasks, or a normalised .jsonl file")
    p.add_argument("--tasks", default="", help="subset of the suite's tasks, comma separated")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--split", default="test")
    p.add_argument("--max-per-task", type=int, default=200, help="test examples per task (0: all)")
    p.add_argument("--mode", choices=["generate", "loglik"], default="generate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=None, help="results.json path (default: inside --adapter-dir, else ./results.json)")
    args = p.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run(args):
    from nanoalign.adapters import load_adapter, merge_adapters
    from nanoalign.data import load_tasks

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    model_name = args.model
    if args.adapter_dir:
        cfg_file = Path(args.adapter_dir) / "adapter_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: not a nanoalign adapter directory (train.py writes out/<run>/adapter)")
        model_name = model_name or json.loads(cfg_file.read_text()).get("base_model")
    model_name = model_name or "smollm2-135m"
    tasks = load_tasks(args.data, args.split, data_dir=args.data_dir, max_per_task=args.max_per_task or None,
                       seed=args.seed, tasks=[t for t in args.tasks.split(",") if t] or None)
    tok = nanoalign.load_tokenizer(model_name)
    model = nanoalign.load_model(model_name, dtype=dtype, device=device)
    label = "base"
    if args.adapter_dir:
        load_adapter(model, args.adapter_dir)
        try:
            merge_adapters(model)
            label = "adapter (merged)"
        except ValueError as e:  # routers and per-task adapters stay unmerged
            print(f"not merged: {e}")
            label = "adapter"
    acc = evaluate(model, tok, tasks, mode=args.mode, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    title = f"{model_name} + {args.adapter_dir or 'no adapter'}: accuracy (%), {args.mode}, split {args.split}"
    print(markdown_table({label: acc}, title=title))
    out = Path(args.out) if args.out else Path(args.adapter_dir or ".") / "results.json"
    result = {"model": model_name, "adapter_dir": args.adapter_dir, "mode": args.mode, "split": args.split,
              "accuracy": acc, "average": sum(acc.values()) / len(acc)}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
