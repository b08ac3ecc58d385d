"""Per-task accuracy of a base model, or of a base model plus an adapter trained by train.py, with diagnostics.

    python eval.py                                                # smollm2-135m on the builtin suite's test split
    python eval.py --adapter-dir out/smollm2-135m-align-r8
    python eval.py --model qwen2.5-0.5b --data commonsense --mode cloze --max-per-task 0   # whole dev splits

Scoring (nanoalign/evaluate.py): greedy generation and answer extraction as the paper does (`--mode generate`,
METHODS §5.1), option log-likelihood of the paper's label format (`--mode loglik`), or lm-evaluation-harness's cloze
convention (`--mode cloze`: the cloze format of each task, acc and acc_norm). Mergeable adapters are folded into the
base weights first (W0 + ΔW), so evaluation runs at base-model speed; routers and per-task adapters run unmerged.

Prints one table per evaluation: per task the accuracy ± its standard error, n, the majority-class rate of the test
set and the most frequent predictions, with collapsed tasks (one prediction > 90%) marked. Writes the results JSON
and one record per example (`.predictions.jsonl`: task, index in its split, gold, prediction, per-option scores)
under the run (`<run>/eval/`), or `out/eval/<model>/` for a base model, or `--out FILE`; an existing result is never
replaced unless `--overwrite` is given.

`--export-peft DIR` writes the adapter's Hugging Face PEFT LoRA form instead of evaluating (the same as train.py
writes to <run>/peft): DIR itself, or for MTL-LoRA one directory per training task, DIR/<task>, holding ΔW_t of that
task id (PEFT then loads each as a plain LoRA). Routers (HydraLoRA, R-LoRA) have no PEFT form: a one-line error.

This file is the evaluation itself; the command line, the files and the checks are nanoalign/plumbing/eval_cli.py.
"""

import nanoalign  # before torch: it sets OMP_WAIT_POLICY (nanoalign/__init__.py)

import sys
import time

from nanoalign.adapters import merge_adapters
from nanoalign.evaluate import evaluate


def fold(model, merge=True):
    """Fold a mergeable adapter into the base weights, W = W0 + ΔW (METHODS §2.1), so that scoring runs at the base
    model's speed. Returns a label of what is scored: "base", the adapter kind, or "<kind> (merged)". Routers and
    per-task adapters (MTL-LoRA's ΔW_t) have no single merged weight and stay unmerged, with a note."""
    if not getattr(model, "adapter_config", None):
        return "base"
    kind = model.adapter_config["kind"]
    if not merge:
        return kind
    try:
        merge_adapters(model)
        return f"{kind} (merged)"
    except ValueError as e:
        print(f"note: evaluating unmerged: {e}", file=sys.stderr)
        return kind


def score(model, tok, tasks, mode="generate", batch_size=32, max_new_tokens=16, task_ids=None, progress=None):
    """Every task of `tasks` scored as `mode` says (nanoalign.evaluate.evaluate), options batched by continuation
    length; (results, seconds)."""
    t0 = time.perf_counter()
    results = evaluate(model, tok, tasks, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       task_ids=task_ids, progress=progress, by_length=True)
    return results, time.perf_counter() - t0


if __name__ == "__main__":
    from nanoalign.plumbing.eval_cli import main
    main(eval_py=sys.modules[__name__])
