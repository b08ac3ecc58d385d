"""Per-task accuracy, the way the Align-LoRA paper reports it (METHODS §5.1).

Two scorers:
  generate  greedy decoding (left padding, KV cache), answer taken from the generated text and compared with the
            gold label (`nanoalign.data.extract_answer`: numbers as floats, option letters by regex, else
            lower-cased exact match) — what the paper's test scripts do;
  loglik    for tasks with a fixed option set: the option whose tokens have the highest summed log-probability
            after the prompt wins (no generation, no parsing; the usual lm-eval-harness style).
The reported average is the unweighted mean over tasks, as in the paper's tables.
"""

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import extract_answer


def _left_pad(seqs, pad_id, device):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = True
    return ids.to(device), mask.to(device)


def _right_pad(seqs, pad_id, device):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids.to(device), mask.to(device)


def _batches(items, batch_size):
    """Length-sorted batches (less padding), yielding original indices with them."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [items[i] for i in idx]


@torch.no_grad()
def generate_texts(model, tok, prompts, batch_size=32, max_new_tokens=16, max_prompt_len=1024, desc="generate"):
    """Greedy continuation of each prompt, decoded (special tokens dropped)."""
    device = next(model.parameters()).device
    encoded = [tok.encode(p)[-max_prompt_len:] for p in prompts]
    out = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, leave=False, disable=len(prompts) < batch_size)
    for idx, seqs in _batches(encoded, batch_size):
        ids, mask = _left_pad(seqs, tok.pad_id, device)
        new = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id)
        for i, row in zip(idx, new.tolist()):
            if tok.eos_id in row:
                row = row[:row.index(tok.eos_id)]
            out[i] = tok.decode(row)
        bar.update(len(idx))
    bar.close()
    return out


@torch.no_grad()
def option_logprobs(model, tok, examples, batch_size=32, max_len=1024, desc="loglik"):
    """Summed log-probability of every option given its prompt: list (per example) of list (per option) of float."""
    device = next(model.parameters()).device
    rows = []  # (example index, option index, prompt ids, option ids)
    for e, ex in enumerate(examples):
        p = tok.encode(ex["prompt"])
        for o, opt in enumerate(ex["options"]):
            a = tok.encode(" " + opt.lstrip())  # answers follow "Answer:" after one space, as in training
            rows.append((e, o, p[-(max_len - len(a)):], a))
    scores = [[0.0] * len(ex["options"]) for ex in examples]
    seqs = [r[2] + r[3] for r in rows]
    bar = tqdm(total=len(rows), desc=desc, leave=False, disable=len(rows) < batch_size)
    for idx, batch in _batches(seqs, batch_size):
        ids, mask = _right_pad(batch, tok.pad_id, device)
        tgt = torch.zeros_like(mask)
        for j, i in enumerate(idx):
            n_p, n_a = len(rows[i][2]), len(rows[i][3])
            tgt[j, n_p - 1:n_p - 1 + n_a] = True  # positions whose next token is an option token
        logp = F.log_softmax(model(ids, mask, logits_at=tgt).float(), -1)
        nxt = ids[:, 1:][tgt[:, :-1]]
        token_lp = logp.gather(-1, nxt[:, None]).squeeze(-1)
        per_row = torch.zeros(len(idx), device=device).index_add_(0, tgt.nonzero()[:, 0], token_lp)
        for j, i in enumerate(idx):
            scores[rows[i][0]][rows[i][1]] = per_row[j].item()
        bar.update(len(idx))
    bar.close()
    return scores


def evaluate(model, tok, tasks, mode="generate", batch_size=32, max_new_tokens=16):
    """{task: [examples]} -> {task: accuracy in [0, 1]}. `mode` is "generate" or "loglik" (falls back to generate
    for tasks without options)."""
    was_training = model.training
    model.eval()
    acc = {}
    for name, examples in tasks.items():
        if mode == "loglik" and all(ex.get("options") for ex in examples):
            scores = option_logprobs(model, tok, examples, batch_size, desc=f"{name} loglik")
            correct = [ex["options"][max(range(len(s)), key=s.__getitem__)].strip() == ex["answer"].strip()
                       for ex, s in zip(examples, scores)]
        else:
            texts = generate_texts(model, tok, [ex["prompt"] for ex in examples], batch_size, max_new_tokens,
                                   desc=f"{name} generate")
            correct = [extract_answer(t, ex["answer"]) for t, ex in zip(texts, examples)]
        acc[name] = sum(correct) / max(len(correct), 1)
    model.train(was_training)
    return acc


def markdown_table(results: dict, title="accuracy (%)") -> str:
    """{column: {task: acc}} -> a markdown table with one row per task and an unweighted average row."""
    cols = list(results)
    tasks = sorted({t for r in results.values() for t in r})
    lines = [f"| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{100 * results[c][t]:.1f}" if t in results[c] else "–"
                                              for c in cols) + " |")
    avg = [sum(r.values()) / len(r) * 100 if r else float("nan") for r in results.values()]
    lines.append("| **average** | " + " | ".join(f"**{a:.1f}**" for a in avg) + " |")
    return f"{title}\n\n" + "\n".join(lines)
