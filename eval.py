"""Per-task accuracy of a base model, or of a base model plus an adapter trained by train.py, with diagnostics.

    python eval.py                                                # smollm2-135m on the builtin suite's test split
    python eval.py --adapter-dir out/smollm2-135m-align-r8
    python eval.py --model qwen2.5-0.5b --data commonsense --mode cloze --max-per-task 0   # whole dev splits

Scoring (METHODS §5.1): `--mode generate` (the paper's answer extraction), `loglik` (option log-likelihood) or
`cloze` (lm-evaluation-harness's acc and acc_norm). Mergeable adapters are folded into the base weights first
(W = W0 + ΔW), so evaluation runs at base-model speed; routers and per-task adapters run unmerged.
"""

import nanoalign  # before torch: it sets OMP_WAIT_POLICY (nanoalign/__init__.py)

import sys
import time

from nanoalign.adapters import merge_adapters
from nanoalign.evaluate import evaluate


def fold(model, merge=True):
    """W = W0 + ΔW (METHODS §2.1) where ΔW is one fixed matrix (not for routers or MTL-LoRA's ΔW_t) -> a label."""
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


def score(model, tok, tasks, mode="generate", batch_size=32, max_new_tokens=16, task_ids=None, progress=None,
          scorer=None):
    """(results, seconds) of `evaluate` (scorer: its option scorer; the command line passes the fast form)."""
    t0 = time.perf_counter()
    results = evaluate(model, tok, tasks, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       task_ids=task_ids, progress=progress, scorer=scorer)
    return results, time.perf_counter() - t0


if __name__ == "__main__":
    from nanoalign.plumbing.eval_cli import main
    main(eval_py=sys.modules[__name__])
