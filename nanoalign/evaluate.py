"""Per-task accuracy, the way the Align-LoRA paper reports it (METHODS §5.1).

Two scorers:
  generate  greedy decoding of each prompt (left padding, KV cache), the prediction taken from the generated text and
            compared with the gold label by `nanoalign.data.extract_answer` (text after the last "Answer:", numbers as
            floats, option letters by regex, else lower-cased exact match without periods), as the paper's test
            scripts do;
  loglik    for tasks with a fixed option set: the option whose tokens have the highest summed log-probability
            after the prompt wins, log p(option | prompt) = Σ_k log p(o_k | prompt, o_<k) (no generation, no
            parsing; the lm-eval-harness style). Prompt and option are tokenised apart, as in training.
The reported average is the unweighted mean over tasks, as in the paper's tables.

Adapters that need the task id at inference (MTL-LoRA) get it through `adapter_context`: pass `task_ids`, the
{task name: id} map used in training.
"""

import torch
from tqdm import tqdm

from .adapters import adapter_context
from .data import IGNORE_INDEX, answer_positions, extract_answer, left_pad, pad_right


def _batches(seqs, batch_size):
    """Length-sorted batches (less padding): yields (original indices, sequences)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [seqs[i] for i in idx]


def _task_context(model, task_id, batch, device):
    """adapter_context with every row tagged with the task's id (a no-op for adapters that ignore task ids)."""
    ids = None if task_id is None else torch.full((batch,), task_id, dtype=torch.long, device=device)
    return adapter_context(model, task_ids=ids)


@torch.no_grad()
def generate_texts(model, tok, prompts, batch_size=32, max_new_tokens=16, max_prompt_len=1024, task_id=None,
                   bar=None):
    """Greedy continuation of each prompt, decoded up to the first stop token (special tokens dropped)."""
    device = next(model.parameters()).device
    encoded = [tok.encode(p)[-max_prompt_len:] for p in prompts]
    stops = set(getattr(tok, "stop_ids", None) or [tok.eos_id])
    out = [None] * len(prompts)
    for idx, seqs in _batches(encoded, batch_size):
        ids, mask = left_pad(seqs, tok.pad_id)
        with _task_context(model, task_id, len(idx), device):
            new = model.generate(ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=sorted(stops), pad_token_id=tok.pad_id)
        for i, row in zip(idx, new.tolist()):
            end = next((k for k, t in enumerate(row) if t in stops), len(row))
            out[i] = tok.decode(row[:end])
        if bar is not None:
            bar.update(len(idx))
    return out


@torch.no_grad()
def option_logprobs(model, tok, examples, batch_size=32, max_len=1024, task_id=None, bar=None):
    """Summed log-probability of every option after its prompt: list (per example) of lists (per option) of floats.

    Each (prompt, option) pair is one right-padded row whose labels are the option tokens (-100 elsewhere), so the
    scored positions are exactly those `train.py` puts the loss on; logits are computed only there.
    """
    device = next(model.parameters()).device
    rows = []  # (example index, option index, input ids, labels)
    for e, ex in enumerate(examples):
        prompt = tok.encode(ex["prompt"])
        for o, option in enumerate(ex["options"]):
            answer = tok.encode(option)  # options carry their leading space, like the answers train.py learns
            p = prompt[max(0, len(prompt) - (max_len - len(answer))):]
            rows.append((e, o, p + answer, [IGNORE_INDEX] * len(p) + answer))
    scores = [[0.0] * len(ex["options"]) for ex in examples]
    for idx, seqs in _batches([r[2] for r in rows], batch_size):
        ids, mask, labels = pad_right(seqs, [rows[i][3] for i in idx], tok.pad_id)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        at, targets = answer_positions(labels)
        with _task_context(model, task_id, len(idx), device):
            logp = model(ids, mask, logits_at=at).float().log_softmax(-1)
        token_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
        per_row = torch.zeros(len(idx), device=device).index_add_(0, at.nonzero()[:, 0], token_lp)
        for j, i in enumerate(idx):
            scores[rows[i][0]][rows[i][1]] = per_row[j].item()
        if bar is not None:
            bar.update(len(idx))
    return scores


def needs_task_ids(model):
    """True for adapters whose output depends on the task id at inference (MTL-LoRA)."""
    return (getattr(model, "adapter_config", None) or {}).get("kind") == "mtl"


def evaluate(model, tok, tasks, mode="generate", batch_size=32, max_new_tokens=16, task_ids=None, desc="eval"):
    """{task: [examples]} -> {task: accuracy in [0, 1]}.

    mode "generate" or "loglik"; loglik falls back to generate for a task whose examples lack options.
    task_ids: {task name: id} as in training, for adapters that need it (MTL-LoRA); ignored by the others.
    """
    if mode not in ("generate", "loglik"):
        raise ValueError(f"evaluation mode must be 'generate' or 'loglik', got {mode!r}")
    if needs_task_ids(model):
        unknown = [t for t in tasks if t not in (task_ids or {})]
        if unknown:
            raise ValueError(f"an mtl adapter needs the training task id of every task it is evaluated on; it was "
                             f"not trained on {', '.join(unknown)}")
    loglik = {t: mode == "loglik" and all(ex.get("options") for ex in rows) for t, rows in tasks.items()}
    total = sum(len(rows) * (len(rows[0]["options"]) if loglik[t] else 1) for t, rows in tasks.items() if rows)
    was_training = model.training
    model.eval()
    acc = {}
    with tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) as bar:
        for name, examples in tasks.items():
            bar.set_postfix_str(name)
            tid = (task_ids or {}).get(name)
            if loglik[name]:
                scores = option_logprobs(model, tok, examples, batch_size, task_id=tid, bar=bar)
                correct = [ex["options"][max(range(len(s)), key=s.__getitem__)] == ex["answer"]
                           for ex, s in zip(examples, scores)]
            else:
                texts = generate_texts(model, tok, [ex["prompt"] for ex in examples], batch_size, max_new_tokens,
                                       task_id=tid, bar=bar)
                correct = [extract_answer(t, ex["answer"]) for t, ex in zip(texts, examples)]
            acc[name] = sum(correct) / max(len(correct), 1)
    model.train(was_training)
    return acc


def markdown_table(results: dict, title="accuracy (%)") -> str:
    """{column: {task: acc}} -> a markdown table, one row per task plus the unweighted average of each column."""
    cols = list(results)
    tasks = sorted({t for r in results.values() for t in r})
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{100 * results[c][t]:.1f}" if t in results[c] else "–"
                                              for c in cols) + " |")
    avg = [f"**{100 * sum(r.values()) / len(r):.1f}**" if r else "–" for r in results.values()]
    lines.append("| **average** | " + " | ".join(avg) + " |")
    return f"{title}\n\n" + "\n".join(lines)
