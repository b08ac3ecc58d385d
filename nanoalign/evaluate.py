"""Per-task accuracy, with the diagnostics that say whether an accuracy means anything.

Three scorers (METHODS §5.1 for the first two):
  generate  greedy decoding (left padding, KV cache), answer extracted by `nanoalign.data.extract_answer`;
  loglik    argmax over options of log p(option | prompt) = Σ_k log p(o_k | prompt, o_<k), tokenised apart as in
            training;
  cloze     lm-evaluation-harness's convention: context + continuation tokenised together; `acc` = argmax of the
            summed log-probs, `acc_norm` = argmax of the sum over the choice's length in characters.

A small model often answers one label for almost every example, and then an accuracy is only that label's share of
the test set. So every result carries the majority-class rate, the prediction histogram and a `collapsed` flag (one
prediction > 90%), plus one record per example so runs compare example by example. Averages are unweighted over tasks.
"""

import math
from collections import Counter

import torch

from .adapters import adapter_context, adapter_modules
from .data import choices_of, extract_answer, left_pad, predicted_answer, text_tail
from .data import GENERATION_TOKENS

MODES = ("generate", "loglik", "cloze")
COLLAPSED = 0.9  # a task is "collapsed" when one prediction covers more than this share of its examples


def _batches(seqs, batch_size, lengths=None):
    """(original indices, sequences) in batches sorted by length: less padding."""
    lengths = lengths or [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [seqs[i] for i in idx]


def _task_context(model, task_id, batch, device):
    """adapter_context with every row tagged with the task's id (a no-op for adapters that ignore task ids)."""
    ids = None if task_id is None else torch.full((batch,), task_id, dtype=torch.long, device=device)
    return adapter_context(model, task_ids=ids)


@torch.no_grad()
def generate_texts(model, tok, prompts, batch_size=32, max_new_tokens=16, max_prompt_len=1024, task_id=None,
                   advance=None):
    """Greedy continuation of each prompt, decoded up to the first stop token (special tokens dropped)."""
    device = next(model.parameters()).device
    encoded = [tok.encode(text_tail(tok, p, max_prompt_len))[-max_prompt_len:] for p in prompts]
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
        if advance:
            advance(len(idx))
    return out


def encode_pair(tok, context, continuation, joint):
    """(context ids, continuation ids), tokenised apart, or (joint) as the harness's `_encode_pair`: trailing spaces
    move to the continuation, and the continuation is what follows the context's tokens in the joint encoding."""
    if not joint:
        return tok.encode(context), tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    cont = whole[len(ctx):]
    if not cont or whole[:len(ctx)] != ctx:  # a merge across the boundary: the harness's slice would be wrong
        return ctx, tok.encode(continuation)
    return ctx, cont


def encode_choices(tok, ex, max_len, joint):
    """`encode_pair` of each choice of `ex`, its context read from the text that holds its last max_len tokens; an
    empty context becomes [eos] (the harness scores it after its prefix token)."""
    pairs = [encode_pair(tok, text_tail(tok, context, max_len), continuation, joint)
             for context, continuation in choices_of(ex)[0]]
    return [(ctx or [tok.eos_id], cont) for ctx, cont in pairs]


@torch.no_grad()
def choice_logprobs(model, tok, examples, batch_size=32, max_len=1024, joint=False, task_id=None, advance=None):
    """Summed log p(continuation | context) of every choice of every example -> (scores, token counts), per example
    per choice.

    Each choice is one row: context + continuation, the context cut from the left so that every choice of its
    example fits in max_len. Position t's logits score token t + 1, so the
    continuation's n tokens are scored at the n positions before the last. plumbing/fast.py's `choice_logprobs`
    computes the same sums with each shared prefix run once (tests/test_eval.py keeps the two equal).
    """
    device = next(model.parameters()).device
    rows = []  # (example, choice, token ids, n): the last n tokens are the continuation
    for e, ex in enumerate(examples):
        pairs = encode_choices(tok, ex, max_len, joint)
        keep = max(1, max_len - max(len(cont) for _, cont in pairs))
        rows += [(e, c, ctx[-keep:] + cont, len(cont)) for c, (ctx, cont) in enumerate(pairs)]
    scores = [[0.0] * len(choices_of(ex)[0]) for ex in examples]
    lengths = [[0] * len(s) for s in scores]
    for idx, seqs in _batches([r[2] for r in rows], batch_size):
        ids, mask = left_pad(seqs, tok.pad_id)
        T, n = ids.shape[1], torch.tensor([rows[i][3] for i in idx])
        t = torch.arange(T)
        at = (t >= T - 1 - n[:, None]) & (t < T - 1)  # the positions that predict the continuation's tokens
        with _task_context(model, task_id, len(idx), device):
            logp = model(ids.to(device), mask.to(device), logits_at=at.to(device)).float().log_softmax(-1)
        token_lp = logp.gather(-1, ids[:, 1:][at[:, :-1]].to(device)[:, None]).squeeze(-1)
        sums = torch.zeros(len(idx), device=device).index_add(0, at.nonzero()[:, 0].to(device), token_lp)
        for i, v in zip(idx, sums.tolist()):
            e, c, _, k = rows[i]
            scores[e][c], lengths[e][c] = v, k
        if advance:
            advance(len(idx))
    return scores, lengths


def needs_task_ids(model):
    """True for adapters whose output depends on the task id at inference (MTL-LoRA)."""
    return any(m.needs_task_ids for _, m in adapter_modules(model))


# ----------------------------------------------------------------------------------------------------------------
# diagnostics

def choice_labels(examples):
    """Choice names for the histograms: the shared option texts, else positions '1', '2', ... (cloze options vary)."""
    lists = {tuple(o.strip() for o in ex["options"]) if "options" in ex else None for ex in examples}
    if len(lists) == 1 and None not in lists:
        return list(next(iter(lists)))
    return [str(i + 1) for i in range(max(len(choices_of(ex)[0]) for ex in examples))]


def char_length(ex, c):
    """The harness's `completion_len`: characters of the choice (no joining space), or of its context."""
    if "contexts" in ex:
        return len(ex["contexts"][c])
    option = ex["options"][c]
    return len(option[1:] if option.startswith(" ") else option)


def summarise(records, n_choices=None):
    """Accuracy ± binomial SE √(acc(1−acc)/n), majority-class rate and prediction histograms of one task's records."""
    n = len(records)
    acc = sum(r["correct"] for r in records) / max(n, 1)
    pred, gold = Counter(r["pred"] for r in records), Counter(r["gold"] for r in records)
    top_label, top = pred.most_common(1)[0] if pred else (None, 0)
    out = {"n": n, "accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n) if n else 0.0,
           "majority_rate": gold.most_common(1)[0][1] / n if n else 0.0,
           "majority_label": gold.most_common(1)[0][0] if n else None,
           "top_prediction": top_label, "top_share": top / n if n else 0.0, "collapsed": n > 0 and top / n > COLLAPSED,
           "predicted": dict(pred.most_common()), "gold": dict(gold.most_common())}
    if records and "correct_norm" in records[0]:
        out["acc_norm"] = sum(r["correct_norm"] for r in records) / n
    return out


def scored_tasks(tasks, mode):
    """{task: scored by options (True) or generated}: a task without options on every example falls back."""
    return {t: mode != "generate" and bool(rows) and all(choices_of(ex)[0] for ex in rows) for t, rows in tasks.items()}


def generation_fallback(tasks, mode):
    """The tasks that `evaluate` will generate for although `mode` asks for option scores (none in generate mode)."""
    return [t for t, scored in scored_tasks(tasks, mode).items() if mode != "generate" and not scored]


def task_result(records, mode):
    """One task's result: `summarise` of its records, the mode it was scored in, and the records."""
    return {**summarise(records), "mode": mode, "records": records}


def evaluate(model, tok, tasks, mode="generate", batch_size=32, max_new_tokens=16, task_ids=None,
             progress=None, scorer=None):
    """{task: [examples]} -> {task: `task_result`}, one record per example in order.

    Tasks without options are generated whatever the mode (the result's "mode" says so). task_ids {task name: id}
    as in training, for MTL-LoRA; progress(done, total, task) is called after every batch. scorer: a function with
    `choice_logprobs`' signature and results (default: it; eval.py, train.py and the grids pass the fast form).
    """
    scorer = scorer or choice_logprobs
    if mode not in MODES:
        raise ValueError(f"evaluation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if needs_task_ids(model):
        unknown = [t for t in tasks if t not in (task_ids or {})]
        if unknown:
            raise ValueError(f"an mtl adapter needs the training task id of every task it is evaluated on; it was "
                             f"not trained on {', '.join(unknown)}")
    scored = scored_tasks(tasks, mode)
    total = sum(len(rows) * (len(choices_of(rows[0])[0]) if scored[t] else 1) for t, rows in tasks.items() if rows)
    done, name = 0, None

    def advance(n):
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, name)

    was_training = model.training
    model.eval()
    results = {}
    for name, examples in tasks.items():
        tid = (task_ids or {}).get(name)
        records = []
        if scored[name]:
            scores, lengths = scorer(model, tok, examples, batch_size, joint=mode == "cloze", task_id=tid,
                                     advance=advance, max_len=model.config.max_position_embeddings)  # the whole window
            labels = choice_labels(examples)
            for ex, s, n in zip(examples, scores, lengths):
                gold, best = choices_of(ex)[1], max(range(len(s)), key=s.__getitem__)
                r = {"task": name, "index": ex.get("index"), "gold": labels[gold], "pred": labels[best],
                     "correct": best == gold, "scores": s, "tokens": n}
                if mode == "cloze":
                    norm = [v / max(char_length(ex, c), 1) for c, v in enumerate(s)]
                    r["pred_norm"] = labels[max(range(len(s)), key=norm.__getitem__)]
                    r["correct_norm"] = r["pred_norm"] == r["gold"]
                records.append(r)
        else:
            budget = max(max_new_tokens, GENERATION_TOKENS.get(name, 0))
            texts = generate_texts(model, tok, [ex["prompt"] for ex in examples], batch_size, budget, task_id=tid,
                                   advance=advance)
            for ex, text in zip(examples, texts):
                options = [o for o in ex.get("options", []) if extract_answer(text, o, ex["prompt"])]
                records.append({"task": name, "index": ex.get("index"), "gold": predicted_answer(ex["answer"],
                                ex["answer"]) if not ex.get("options") else ex["answer"].strip(),
                                "pred": options[0].strip() if options else predicted_answer(text, ex["answer"]),
                                "correct": extract_answer(text, ex["answer"], ex["prompt"]), "text": text})
        results[name] = task_result(records, mode if scored[name] else "generate")
    model.train(was_training)
    return results


def accuracies(results):
    """{task: result} -> {task: accuracy}."""
    return {t: r["accuracy"] for t, r in results.items()}


def without_records(results):
    """The results without their per-example records (what results.json files keep)."""
    return {t: {k: v for k, v in r.items() if k != "records"} for t, r in results.items()}


def _histogram(counts, n, k=3):
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{label} {100 * c / n:.0f}%" for label, c in top[:k])
    return text + (f", +{len(top) - k} more" if len(top) > k else "")


def diagnostics_table(results, title="per-task diagnostics"):
    """A markdown table of one evaluation: accuracy ± SE, n, majority rate, top predictions; collapsed tasks marked."""
    norm = any("acc_norm" in r for r in results.values())
    lines = ["| task | n | acc (%) ± SE" + (" | acc_norm (%)" if norm else "") + " | majority (%) | predicted |",
             "|---|---:|---:|" + ("---:|" if norm else "") + "---:|---|"]
    for t, r in results.items():
        mark = " **collapsed**" if r["collapsed"] else ""
        lines.append(f"| {t}{mark} | {r['n']} | {100 * r['accuracy']:.1f} ± {100 * r['se']:.1f}"
                     + (f" | {100 * r['acc_norm']:.1f}" if norm and "acc_norm" in r else " | –" if norm else "")
                     + f" | {100 * r['majority_rate']:.1f} | {_histogram(r['predicted'], r['n'])} |")
    avg = sum(r["accuracy"] for r in results.values()) / max(len(results), 1)
    lines.append(f"| **average** | | **{100 * avg:.1f}** |" + (" |" if norm else "") + " | |")
    collapsed = [t for t, r in results.items() if r["collapsed"]]
    note = (f"\n\ncollapsed ({', '.join(collapsed)}): one prediction covers more than {100 * COLLAPSED:.0f}% of the "
            "examples, so the accuracy there is that label's share of the test set") if collapsed else ""
    return f"{title}\n\n" + "\n".join(lines) + note


def markdown_table(results: dict, title="accuracy (%)") -> str:
    """{column: {task: accuracy or result}} -> a markdown table with the unweighted average; collapsed marked '(c)'."""
    def acc(v):
        return v["accuracy"] if isinstance(v, dict) else v

    def cell(v):
        return f"{100 * acc(v):.1f}" + (" (c)" if isinstance(v, dict) and v.get("collapsed") else "")

    cols = list(results)
    tasks = sorted({t for r in results.values() for t in r})
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(cell(results[c][t]) if t in results[c] else "–" for c in cols) + " |")
    avg = [f"**{100 * sum(map(acc, r.values())) / len(r):.1f}**" if r else "–" for r in results.values()]
    lines.append("| **average** | " + " | ".join(avg) + " |")
    marked = any(isinstance(v, dict) and v.get("collapsed") for r in results.values() for v in r.values())
    return f"{title}\n\n" + "\n".join(lines) + ("\n\n(c): collapsed, one prediction > 90% of the examples"
                                                if marked else "")
