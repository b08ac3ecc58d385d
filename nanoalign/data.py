"""Multi-task data for nanoalign: answer-only tokenisation, task-balanced micro-batches, answer scoring.

METHODS §5.1 (loss on the answer only; answer extraction) and §3.7 (every micro-batch holds k examples of every
task, so the alignment loss always sees every task). An example (data/README.md):

    {"task": "sst2", "prompt": "...\\nAnswer:", "answer": " positive", "options": [" negative", " positive"]}

Cloze examples add `"gold"` (the correct option's index); WinoGrande's partial scoring has `"contexts"` instead of
`options`. Task ids are the positions of the task names in sorted order, everywhere.
"""

import random
import re

import torch

IGNORE_INDEX = -100
GENERATION_TOKENS = {"gsm8k": 256}  # max new tokens where the answer is a worked solution (others: one word)


def choices_of(ex):
    """(context, continuation) pairs to score, and the index of the correct one; ([], None) without options."""
    if "contexts" in ex:
        return [(c, ex["answer"]) for c in ex["contexts"]], ex["gold"]
    if "options" in ex:
        return [(ex["prompt"], o) for o in ex["options"]], ex.get("gold", ex["options"].index(ex["answer"]))
    return [], None


# ----------------------------------------------------------------------------------------------------------------
# tokenisation

class TooLong(ValueError):
    """An example whose answer (+ eos) leaves no room for the prompt in max_len tokens."""


def text_tail(tok, text, max_tokens):
    """The last 2·max_tokens·tok.max_token_chars characters of `text`: enough to tokenise its last max_tokens tokens
    exactly, the first half giving the pre-tokeniser room to fall back in step with the whole text."""
    keep = 2 * max(max_tokens, 1) * tok.max_token_chars
    return text[-keep:] if len(text) > keep else text


def encode_example(tok, ex, max_len):
    """input_ids = prompt + answer + [eos], labels = -100 on the prompt (METHODS §5.1): the loss is on the answer
    and on eos, which the model must learn to emit so greedy decoding stops.

    Prompt and answer are tokenised apart: the ids a model sees when it generates after the prompt. Over max_len
    the prompt is cut from the left, so the answer and the "Answer:" cue survive.
    """
    if len(ex["answer"]) >= max_len * tok.max_token_chars:  # surely over max_len tokens: not worth tokenising
        raise TooLong(f"answer of a {ex['task']} example is {len(ex['answer'])} characters, more than "
                      f"max_len={max_len} tokens hold")
    answer = [int(i) for i in tok.encode(ex["answer"])] + [int(tok.eos_id)]
    if len(answer) >= max_len:
        raise TooLong(f"answer of a {ex['task']} example is {len(answer)} tokens with eos, more than "
                      f"max_len={max_len} leaves for the prompt: raise max_len")
    keep = max_len - len(answer)
    prompt = [int(i) for i in tok.encode(text_tail(tok, ex["prompt"], keep))]
    prompt = prompt[max(0, len(prompt) - keep):]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def encode_fitting(tok, rows, max_len):
    """encode_example over `rows` without the examples whose answer does not fit (TooLong): (encoded, skipped)."""
    out = []
    for ex in rows:
        try:
            out.append(encode_example(tok, ex, max_len))
        except TooLong:
            pass
    return out, len(rows) - len(out)


def encode_tasks(tok, tasks, max_len):
    """encode_example over dict[task -> list[example]] -> dict[task -> list[(input_ids, labels)]]."""
    return {t: [encode_example(tok, ex, max_len) for ex in rows] for t, rows in tasks.items()}


def pad_right(seqs, labels, pad_id):
    """Right-pad to the longest sequence: input_ids [B,T] int64, attention_mask [B,T] bool, labels [B,T] int64."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    lab = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        lab[i, :len(l)] = torch.tensor(l, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask, lab


def answer_positions(labels):
    """(bool [B, T] positions whose next token is labelled, [N] those tokens): logits at t predict token t+1."""
    at = torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    return at, labels[:, 1:][at[:, :-1]]


def logit_indices(at):
    """Flat indices b·T + t of a bool [B, T] mask: their count is known on the host, whereas indexing with a bool
    mask on a GPU waits for the device to count it."""
    if at.dtype != torch.bool or at.dim() != 2:
        raise ValueError(f"logit_indices takes a bool [batch, seq] mask, got {at.dtype} of shape {tuple(at.shape)}")
    return at.flatten().nonzero().squeeze(1)


def left_pad(batch_of_id_lists, pad_id):
    """Left-pad prompts -> (input_ids, attention_mask) [B, T]: every last token in the column generation continues."""
    T = max(len(s) for s in batch_of_id_lists)
    ids = torch.full((len(batch_of_id_lists), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(batch_of_id_lists), T), dtype=torch.bool)
    for i, s in enumerate(batch_of_id_lists):
        if len(s):
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = True
    return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# task-balanced micro-batches

class BalancedBatcher:
    """Endless iterator of micro-batches holding exactly `per_task` examples of every task (§3.7), right-padded.

    Each task walks its own permutation, a pure function of (seed, task, epoch), so the state is a few integers and
    resumes exactly. Under DDP every rank walks the same global stream and keeps its slice: disjoint, still balanced.
    """

    def __init__(self, encoded_by_task, per_task=1, seed=0, rank=0, world_size=1, pad_id=0):
        if per_task < 1:
            raise ValueError(f"per_task must be >= 1, got {per_task}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not encoded_by_task:
            raise ValueError("no tasks to batch")
        self.tasks = sorted(encoded_by_task)
        self.data = [encoded_by_task[t] for t in self.tasks]
        for t, rows in zip(self.tasks, self.data):
            if len(rows) < per_task * world_size:
                raise ValueError(f"task {t!r} has {len(rows)} examples, fewer than per_task * world_size = "
                                 f"{per_task * world_size} needed for one step")
        self.per_task, self.seed, self.rank, self.world_size, self.pad_id = per_task, seed, rank, world_size, pad_id
        self.step = 0
        self.epoch = [0] * len(self.tasks)
        self.pos = [0] * len(self.tasks)
        self._perm = [None] * len(self.tasks)  # cache of the current epoch's permutation per task

    def permutation(self, t, epoch):
        idx = list(range(len(self.data[t])))
        random.Random(f"{self.seed}/{self.tasks[t]}/{epoch}").shuffle(idx)
        return idx

    def _take(self, t, n):
        """Next n indices of task t's stream, rolling over into a freshly shuffled epoch when one runs out."""
        out = []
        while len(out) < n:
            if self._perm[t] is None or self._perm[t][0] != self.epoch[t]:
                self._perm[t] = (self.epoch[t], self.permutation(t, self.epoch[t]))
            perm = self._perm[t][1]
            k = min(n - len(out), len(perm) - self.pos[t])
            out += perm[self.pos[t]:self.pos[t] + k]
            self.pos[t] += k
            if self.pos[t] == len(perm):
                self.epoch[t], self.pos[t] = self.epoch[t] + 1, 0
        return out

    def __iter__(self):
        return self

    def __next__(self):
        seqs, labels, task_ids = [], [], []
        k = self.per_task
        for t in range(len(self.tasks)):
            mine = self._take(t, k * self.world_size)[self.rank * k:(self.rank + 1) * k]
            for i in mine:
                ids, lab = self.data[t][i]
                seqs.append(ids)
                labels.append(lab)
                task_ids.append(t)
        self.step += 1
        input_ids, attention_mask, labels = pad_right(seqs, labels, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "task_ids": torch.tensor(task_ids, dtype=torch.long)}

    def state_dict(self):
        """Position in the stream; the permutations derive from the seed."""
        return {"tasks": list(self.tasks), "seed": self.seed, "per_task": self.per_task,
                "world_size": self.world_size, "step": self.step, "epoch": list(self.epoch), "pos": list(self.pos)}

    def load_state_dict(self, state):
        for key in ("tasks", "seed", "per_task", "world_size"):
            mine = list(self.tasks) if key == "tasks" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"batcher state has {key}={state.get(key)!r} but this batcher has {mine!r}: "
                                 "resume with the same tasks, seed, per_task and world size")
        self.step, self.epoch, self.pos = int(state["step"]), list(state["epoch"]), list(state["pos"])
        self._perm = [None] * len(self.tasks)


def length_groups(lengths, max_groups=4, overhead=16):
    """Rows in k <= max_groups groups of similar length, the split with the fewest padded tokens (+ `overhead` per
    extra forward): a task-balanced batch mixes short and long tasks, so one padded block wastes up to half."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = None
    for k in range(1, min(max_groups, len(order)) + 1):
        groups = [sorted(order[i * len(order) // k:(i + 1) * len(order) // k]) for i in range(k)]  # rows in batch order
        cost = sum(len(g) * max(lengths[j] for j in g) for g in groups) + overhead * (k - 1)
        if best is None or cost < best[0]:
            best = (cost, groups)
    return best[1]


# ----------------------------------------------------------------------------------------------------------------
# evaluation: answer extraction (§5.1)

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
PAREN_LETTER = re.compile(r"\(([A-Z])\)")
LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.,:;)])")
LONE_LETTER = re.compile(r"\b([A-Z])\b")
OPTION_LABEL = re.compile(r"\b(solution|answer|option|ending)\s*(\d+)\b")


def prediction_text(generated_text):
    """The text after the last "Answer:" when present (models may echo the cue), stripped."""
    i = generated_text.rfind("Answer:")
    return (generated_text[i + len("Answer:"):] if i >= 0 else generated_text).strip()


def as_number(text):
    """float of a plain number ("12", "-3.5", "1,000"), else None (so "nan" or "True" are not numbers)."""
    return float(text.replace(",", "")) if NUMBER.fullmatch(text) else None


def normalise(text):
    return text.replace(".", "").strip().lower()


FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_number(text):
    """GSM8K's answer: the number after the last "####" (strict match), else the last number (flexible match)."""
    if found := FINAL.findall(text):
        return as_number(found[-1])
    numbers = [as_number(m) for m in NUMBER.findall(text)]
    numbers = [n for n in numbers if n is not None]
    return numbers[-1] if numbers else None


def predicted_answer(generated_text, gold):
    """The short form of a generated answer for the prediction histogram."""
    pred = prediction_text(generated_text)
    if "####" in gold:
        n = final_number(pred)
        return "none" if n is None else f"{n:g}"
    return normalise(pred.split("\n", 1)[0])[:40]


CHOICE_LINE = re.compile(r"((?:solution|answer|option|ending)\d+|[A-Z]): (.+)", re.IGNORECASE)
BARE_NUMBER = re.compile(r"\(?(\d+)\)?[.:]?")
LABEL = re.compile(r"\(?[A-Z]\)?|(?:solution|answer|option|ending)\s*\d+", re.IGNORECASE)


def listed_options(prompt):
    """{label: text} of the options listed right before a prompt's "Answer format:" line ("A: the sun"), else {}."""
    lines = prompt.split("\n")
    ends = [i for i, line in enumerate(lines) if line.startswith("Answer format:")]
    out = {}
    for line in reversed(lines[:ends[-1]] if ends else []):
        if not (m := CHOICE_LINE.fullmatch(line.strip())):
            break
        out[m.group(1).lower()] = m.group(2)
    return out


def extract_answer(generated_text, gold, prompt=None):
    """Is the generated text (after the last "Answer:") a correct answer to `gold`? By the kind of gold (§5.1):

    - "#### <number>" (GSM8K): the final numbers, as floats;   - a number: the first number, as floats;
    - an option letter: "(X)", else a leading letter, else the first lone capital;
    - "solution1"-style labels: the first such label, else a bare number on the first line;
    - otherwise the first line, lower-cased without periods, must equal gold.

    With `prompt`, a first line equal to one listed option's text names that option. The paper compares labels
    only; accepting the text a model writes instead never credits another option.
    """
    pred, gold = prediction_text(generated_text), gold.strip()
    if "####" in gold:
        p, g = final_number(pred), final_number(gold)
        return p is not None and g is not None and abs(p - g) < 1e-6
    if (g := as_number(gold)) is not None:
        m = NUMBER.search(pred)
        return m is not None and as_number(m.group()) is not None and abs(as_number(m.group()) - g) < 1e-6
    first_line = pred.split("\n", 1)[0]
    letter, label = re.fullmatch(r"\(?([A-Z])\)?", gold), OPTION_LABEL.fullmatch(gold.lower())
    texts = listed_options(prompt) if prompt and (letter or label) else {}
    key = letter.group(1).lower() if letter else gold.lower()
    if key in texts and normalise(first_line) and not LABEL.fullmatch(first_line.strip()):
        named = {k for k, text in texts.items() if normalise(text) == normalise(first_line)}
        if named:
            return key in named
    if letter:
        found = PAREN_LETTER.search(pred) or LEADING_LETTER.search(pred) or LONE_LETTER.search(pred)
        return found is not None and found.group(1) == letter.group(1)
    if label:
        found = OPTION_LABEL.search(pred.lower())
        if found is not None:
            return found.groups() == label.groups()
        bare = BARE_NUMBER.fullmatch(first_line.strip())
        return bare is not None and int(bare.group(1)) == int(label.group(2))
    return normalise(first_line) == normalise(gold)

