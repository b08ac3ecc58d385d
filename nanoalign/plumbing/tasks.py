"""Tasks: prompt templates (METHODS §5.1), parsers for the original benchmark files, and the offline `builtin` suite.

Every parser turns one original row into a normalised example, e.g. {"task": "sst2", "prompt": "...\\nAnswer:",
"answer": " positive", "options": [" negative", " positive"]}: answer and options start with one space, so
`prompt + option` is scored by log-likelihood. Formats: `label` (the paper's prompts and label words), `cloze`
(lm-evaluation-harness's doc_to_text/doc_to_choice with stripped fields; `gold` is the correct option's index,
WinoGrande's options are `contexts`) and `lm-eval` (cloze with the harness's raw strings,
tests/test_lm_eval_strings.py). File layouts: shared/data/SOURCES.md; BBH's first 3 examples are its shots.
"""

import json
import random
import re
import zlib
from functools import partial
from pathlib import Path

GLUE_TASKS = ["sst2", "cola", "qqp", "mrpc", "mnli", "qnli", "rte"]
COMMONSENSE_TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-easy", "arc-challenge", "openbookqa"]
BBH_TASKS = """boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages
    formal_fallacies geometric_shapes hyperbaton logical_deduction_five_objects logical_deduction_seven_objects
    logical_deduction_three_objects movie_recommendation multistep_arithmetic_two navigate object_counting
    penguins_in_a_table reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks
    sports_understanding temporal_sequences tracking_shuffled_objects_five_objects
    tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies word_sorting""".split()
BUILTIN_TASKS = ["colour-review", "flipped-animal", "larger-number", "alphabet-first", "last-letter"]
MATH_TASKS = ["gsm8k"]
SUITES = {"builtin": BUILTIN_TASKS, "glue": GLUE_TASKS, "commonsense": COMMONSENSE_TASKS, "math": MATH_TASKS,
          "bbh": BBH_TASKS}
TASK_SUITE = {task: suite for suite, tasks in SUITES.items() for task in tasks}
FORMATS = ("label", "cloze", "lm-eval")  # the paper's prompts, the harness's cloze, the same with its raw strings
LABEL_ONLY = {"builtin", "bbh"}  # suites with the label format only (synthetic label words; BBH's own targets)

# Training-split caps of the Align-LoRA `load_data` (§5.1; random subsample, seed 42); ARC Easy and Challenge are
# capped each on its own (the paper: together). Unlisted tasks are used in full.
TRAIN_CAPS = {"sst2": 20_000, "qqp": 20_000, "mnli": 10_000, "qnli": 10_000, "boolq": 10_000, "openbookqa": 5_000,
              "piqa": 10_000, "siqa": 10_000, "winogrande": 20_000, "arc-easy": 10_000, "arc-challenge": 10_000}
BBH_SHOTS = 3
TEST_FRACTION = 0.1  # held out when a task has a single labelled split (e.g. our local QNLI and BoolQ)
DEV_SIZE = 300  # dev examples per task, for choices (lr, budget, lambda, ...) made on neither train nor test


def example(task, instruction, question, answer, options=None, choices=None, answer_format=None):
    """Assemble a normalised example. `choices` are (label, text) lines listed before the answer-format line."""
    lines = [instruction, question] + [f"{label}: {text}" for label, text in (choices or [])]
    if options:
        lines.append("Answer format: " + (answer_format or "/".join(o.strip() for o in options)))
    ex = {"task": task, "prompt": "\n".join(lines + ["Answer:"])}
    if answer is not None:  # None only for unlabelled test files
        ex["answer"] = " " + answer
    if options:
        ex["options"] = [" " + o for o in options]
    return ex


def cloze(task, context, choices, gold):
    """A cloze example (lm-evaluation-harness `multiple_choice`); `gold` indexes the correct choice."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is outside the {len(choices)} choices")
    return {"task": task, "prompt": context, "answer": " " + choices[gold], "options": [" " + c for c in choices],
            "gold": gold}


def field(text, fmt):
    """A field of the original row as a cloze prompt uses it: stripped in `cloze`, as it is in `lm-eval`."""
    return text if fmt == "lm-eval" else text.strip()


def check_format(fmt):
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def split_one(rows, seed=42):
    """Deterministic train/test split of a task that ships a single labelled split (shuffle with `seed`)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    test = set(idx[:max(1, round(len(rows) * TEST_FRACTION))])
    return {"train": [r for i, r in enumerate(rows) if i not in test],
            "test": [r for i, r in enumerate(rows) if i in test]}


def subsample(rows, cap, seed=42, salt=""):
    """Keep `cap` rows chosen at random (deterministic in `seed` and `salt`), in their original order."""
    if cap is None or len(rows) <= cap:
        return list(rows)
    keep = sorted(random.Random(f"{seed}/{salt}").sample(range(len(rows)), cap))
    return [rows[i] for i in keep]


def dev_positions(pool, seen, n=DEV_SIZE, seed=42, salt=""):
    """Positions in `pool` of up to n dev examples (seeded, ascending) whose input is not in `seen` (train, test)."""
    def key(ex):
        return ex["prompt"], tuple(ex.get("options", ())), tuple(ex.get("contexts", ()))
    seen = {key(ex) for ex in seen}
    return subsample([i for i, ex in enumerate(pool) if key(ex) not in seen], n, seed=seed, salt=salt)


# ------------------------------------------------------------ low-level readers: every problem names the file and line

def read_lines(path):
    """Yield (line_number, text) of the non-blank lines, BOM and line ending removed; non-UTF-8 is a ValueError."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8").rstrip("\r\n")  # a BOM only at the start
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if line.strip():
                yield i, line


def read_json_lines(path):
    """Yield (line_number, object) of a JSON Lines file (datasets.read_jsonl checks examples)."""
    for i, line in read_lines(path):
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{path}:{i}: JSON nested too deep to be a row") from None


# --- GLUE: tab-separated, no quoting (the files hold unbalanced '"'); read exactly as download_glue_data.py writes them

GLUE = {
    # task: (directory names, text columns, label column, {raw label: label word}, instruction, question)
    "sst2": (("sst2", "SST-2"), ["sentence"], "label", {"0": "negative", "1": "positive"},
             "Task: sentiment analysis (SST-2).", 'Question: What is the sentiment of the sentence "{0}"?'),
    "cola": (("cola", "CoLA"), ["sentence"], "label", {"0": "unacceptable", "1": "acceptable"},
             "Task: grammatical acceptability (CoLA).", 'Question: Is the sentence "{0}" grammatically acceptable?'),
    "qqp": (("qqp", "QQP"), ["question1", "question2"], "is_duplicate", {"0": "different", "1": "duplicate"},
            "Task: duplicate question detection (QQP).",
            'Question: Do the questions "{0}" and "{1}" ask the same thing?'),
    "mrpc": (("mrpc", "MRPC"), ["#1 String", "#2 String"], "Quality", {"0": "different", "1": "equivalent"},
             "Task: paraphrase detection (MRPC).", 'Question: Do the sentences "{0}" and "{1}" mean the same?'),
    "mnli": (("mnli", "MNLI"), ["sentence1", "sentence2"], "gold_label",
             {"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction"},
             "Task: natural language inference (MNLI).",
             'Question: What is the relation between the premise "{0}" and the hypothesis "{1}"?'),
    "qnli": (("qnli", "QNLI"), ["question", "sentence"], "label",
             {"entailment": "entailment", "not_entailment": "not_entailment"},
             "Task: question-answering inference (QNLI).",
             'Question: Does the sentence "{1}" answer the question "{0}"?'),
    "rte": (("rte", "RTE"), ["sentence1", "sentence2"], "label",
            {"entailment": "entailment", "not_entailment": "not_entailment"},
            "Task: recognizing textual entailment (RTE).", 'Question: Does the text "{0}" entail "{1}"?'),
}
# lm-evaluation-harness's GLUE prompts (tasks/glue/<task>/default.yaml): task -> (doc_to_text, {raw label: choice})
GLUE_CLOZE = {
    "sst2": ("{0}\nQuestion: Is this sentence positive or negative?\nAnswer:", {"0": "negative", "1": "positive"}),
    "cola": ("{0}\nQuestion: Does this sentence make sense?\nAnswer:", {"0": "no", "1": "yes"}),
    "qqp": ("Question 1: {0}\nQuestion 2: {1}\nQuestion: Do both questions ask the same thing?\nAnswer:",
            {"0": "no", "1": "yes"}),
    "mrpc": ("Sentence 1: {0}\nSentence 2: {1}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
             {"0": "no", "1": "yes"}),
    "mnli": ("{0}\nQuestion: {1} True, False or Neither?\nAnswer:",
             {"entailment": "True", "neutral": "Neither", "contradiction": "False"}),
    "qnli": ("{0}\n{1}\nQuestion: Does this response answer the question?\nAnswer:",
             {"entailment": "yes", "not_entailment": "no"}),
    "rte": ("{0}\nQuestion: {1} True or False?\nAnswer:", {"entailment": "True", "not_entailment": "False"}),
}
COLA_COLUMNS = ["source", "label", "original_mark", "sentence"]  # CoLA train/dev have no header row


def parse_glue(task, path, fmt="label"):
    """One GLUE tsv -> examples. Columns are found by header name; rows of an unlabelled test file get no answer."""
    dirs, text_cols, label_col, words, instruction, question = GLUE[task]
    template, choice_of = GLUE_CLOZE[task]
    lines = list(read_lines(path))
    if not lines:
        return []
    first = lines[0][1].split("\t")
    if task == "cola" and first[0] != "index":  # CoLA train/dev: 4 columns, no header; CoLA test.tsv has one
        header, rows = COLA_COLUMNS, lines
    else:
        header, rows = first, lines[1:]
    missing = [c for c in text_cols if c not in header]
    if missing:
        raise ValueError(f"{path}:{lines[0][0]}: header has no column {missing[0]!r} for {task} (found {header})")
    labelled = label_col in header
    out = []
    for i, line in rows:
        cols = line.split("\t")
        if len(cols) < len(header):
            raise ValueError(f"{path}:{i}: expected {len(header)} tab-separated columns, found {len(cols)}")
        texts = [field(cols[header.index(c)], fmt) for c in text_cols]
        raw = cols[header.index(label_col)].strip() if labelled else None
        if labelled and raw not in words:
            raise ValueError(f"{path}:{i}: unknown {task} label {raw!r} (expected one of {sorted(words)})")
        if fmt == "label":
            out.append(example(task, instruction, question.format(*texts), words.get(raw),
                               options=list(words.values())))
        elif raw is not None:  # an unlabelled row has no cloze example (nothing to score)
            out.append(cloze(task, template.format(*texts), list(choice_of.values()), list(choice_of).index(raw)))
    return out


def read_glue(task, d, fmt="label"):
    d = Path(d)  # GLUE dev is our test split: GLUE's own test.tsv files carry no labels
    files = {"train": "train.tsv", "test": "dev_matched.tsv" if task == "mnli" else "dev.tsv"}
    splits = {split: parse_glue(task, d / name, fmt) for split, name in files.items() if (d / name).exists()}
    if task == "mrpc" and "train" not in splits and (d / "msr_paraphrase_train.txt").exists():
        splits.update(mrpc_from_msr(d, fmt))
    if task == "mrpc" and (d / "msr_paraphrase_test.txt").exists():  # GLUE's test, labelled in the MSR release
        splits["dev"] = parse_glue(task, d / "msr_paraphrase_test.txt", fmt)
    return splits


def mrpc_from_msr(d, fmt="label"):
    """Rebuild GLUE's MRPC train/dev split from the MSR release, as download_glue_data.py does (dev = dev_ids.tsv)."""
    dev_ids = {tuple(line.split("\t")[:2]) for _, line in read_lines(d / "dev_ids.tsv")}
    path = d / "msr_paraphrase_train.txt"
    ids = [tuple(line.split("\t")[1:3]) for _, line in list(read_lines(path))[1:]]  # (#1 ID, #2 ID) per row
    rows = parse_glue("mrpc", path, fmt)
    return {"train": [r for r, k in zip(rows, ids) if k not in dev_ids],
            "test": [r for r, k in zip(rows, ids) if k in dev_ids]}


def parse_boolq(row, fmt="label"):
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"'answer' should be a JSON true/false, got {answer!r}")
    question = row["question"].strip().rstrip("?") + "?"
    if fmt == "lm-eval":  # super_glue/boolq: the passage is "<title> -- <passage>"; the template adds the "?"
        passage = f"{row['title']} -- {row['passage']}" if "title" in row else row["passage"]
        return cloze("boolq", f"{passage}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(answer))
    if fmt == "cloze":
        return cloze("boolq", f"{row['passage'].strip()}\nQuestion: {question}\nAnswer:", ["no", "yes"], int(answer))
    return example("boolq", "Task: yes/no reading comprehension (BoolQ).",
                   f"Passage: {row['passage'].strip()}\nQuestion: {question}",
                   "true" if answer else "false", options=["true", "false"])


def parse_piqa(row, label, fmt="label"):
    if fmt != "label":
        return cloze("piqa", f"Question: {field(row['goal'], fmt)}\nAnswer:",
                     [field(row["sol1"], fmt), field(row["sol2"], fmt)], int(label))
    choices = [("Solution1", row["sol1"].strip()), ("Solution2", row["sol2"].strip())]
    return example("piqa", "Task: physical commonsense reasoning (PIQA).",
                   f"Question: Which solution reaches the goal: {row['goal'].strip()}",
                   f"solution{int(label) + 1}", options=["solution1", "solution2"], choices=choices)


def parse_siqa(row, label, fmt="label"):
    if fmt != "label":
        return cloze("siqa", f"Q: {field(row['context'], fmt)} {field(row['question'], fmt)}\nA:",
                     [field(row[k], fmt) for k in ("answerA", "answerB", "answerC")], int(label) - 1)
    choices = [(f"Answer{i + 1}", row[k].strip()) for i, k in enumerate(["answerA", "answerB", "answerC"])]
    return example("siqa", "Task: social commonsense reasoning (SIQA).",
                   f"Context: {row['context'].strip()}\nQuestion: {row['question'].strip()}",
                   f"answer{int(label)}", options=["answer1", "answer2", "answer3"], choices=choices)


def clean_hellaswag(text):
    """WikiHow contexts carry '[title]'-style markup; drop it the way common HellaSwag evaluations do."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return re.sub(r"\s+", " ", text).strip()


def parse_hellaswag(row, fmt="label"):
    """Original rowanz/hellaswag jsonl: ctx (= ctx_a + ctx_b), 4 endings, integer label."""
    endings = row["endings"]
    if len(endings) != 4:
        raise ValueError(f"expected 4 endings, found {len(endings)}")
    if fmt != "label":  # the harness's preprocess: ctx_a + " " + ctx_b.capitalize(), markup removed
        ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()}" if "ctx_a" in row else row["ctx"]
        return cloze("hellaswag", clean_hellaswag(f"{row.get('activity_label', '').strip()}: {ctx}"),
                     [clean_hellaswag(e) for e in endings], int(row["label"]))
    context = clean_hellaswag(f"{row.get('activity_label', '').strip()}: {row['ctx']}")
    choices = [(f"Ending{i + 1}", clean_hellaswag(e)) for i, e in enumerate(endings)]
    return example("hellaswag", "Task: sentence completion (HellaSwag).",
                   f"Question: Which ending best completes the text: {context}",
                   f"ending{int(row['label']) + 1}", options=[f"ending{i + 1}" for i in range(4)], choices=choices)


def parse_winogrande(row, label=None, fmt="label"):
    """WinoGrande v1.1 (answer "1"/"2"); cloze: the harness's partial scoring, one context per option."""
    label = row.get("answer") or label
    if str(label) not in ("1", "2"):
        raise ValueError(f"answer should be '1' or '2', got {label!r}")
    if fmt != "label":
        sentence = row["sentence"]
        if sentence.count("_") != 1:
            raise ValueError(f"expected one '_' blank in the sentence, found {sentence.count('_')}")
        blank = sentence.index("_")
        contexts = [sentence[:blank] + field(row[k], fmt) for k in ("option1", "option2")]
        gold = int(label) - 1
        return {"task": "winogrande", "prompt": contexts[gold], "answer": " " + sentence[blank + 1:].strip(),
                "contexts": contexts, "gold": gold}
    choices = [("Option1", row["option1"].strip()), ("Option2", row["option2"].strip())]
    return example("winogrande", "Task: pronoun resolution (WinoGrande).",
                   f"Question: Which option fits the blank _ in: {row['sentence'].strip()}",
                   f"option{label}", options=["option1", "option2"], choices=choices)


def parse_ai2_mc(task, row, fmt="label"):
    """ARC / OpenBookQA, HF-converted or AI2's layout; keys (letters or digits) are re-labelled A, B, C, ..."""
    q = row["question"] if "question" in row else row["question_stem"]
    if isinstance(q, dict):
        stem, texts, keys = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:
        stem, texts, keys = q, row["choices"]["text"], row["choices"]["label"]
    if row["answerKey"] not in keys:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the choice labels {keys}")
    if fmt != "label":  # ARC: "Question: ...\nAnswer:"; OpenBookQA: the bare question stem (harness yamls)
        context = field(stem, fmt) if task == "openbookqa" else f"Question: {field(stem, fmt)}\nAnswer:"
        return cloze(task, context, [field(t, fmt) for t in texts], keys.index(row["answerKey"]))
    opts = [chr(ord("A") + i) for i in range(len(texts))]
    name = {"arc-easy": "science questions (ARC-Easy)", "arc-challenge": "science questions (ARC-Challenge)",
            "openbookqa": "open-book science questions (OpenBookQA)"}[task]
    return example(task, f"Task: {name}.", f"Question: {stem.strip()}", opts[keys.index(row["answerKey"])],
                   options=opts, choices=list(zip(opts, (t.strip() for t in texts))))


def parse_jsonl(path, parse, labels=None):
    """Apply `parse(row[, label])` to every row of a jsonl; a failure names the file and line."""
    rows = list(read_json_lines(path))
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{path}: {len(rows)} rows but {len(labels)} labels in its *-labels.lst file")
    out = []
    for k, (i, row) in enumerate(rows):
        try:
            out.append(parse(row) if labels is None else parse(row, labels[k]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}:{i}: " + (f"missing key {e}" if isinstance(e, KeyError) else str(e))) from None
    return out


COMMONSENSE_FILES = {  # split -> the accepted file stems, first present first (our test: the original dev split)
    "boolq": {"train": ["train"], "test": ["dev"]}, "piqa": {"train": ["train"], "test": ["valid"]},
    "siqa": {"train": ["train"], "test": ["dev"]},
    "hellaswag": {"train": ["hellaswag_train"], "test": ["hellaswag_val"]},  # hellaswag_test.jsonl has no labels
    # train_xs ⊂ ... ⊂ train_xl: the largest non-empty one (the Align-LoRA code concatenates all sizes)
    "winogrande": {"train": [f"train_{s}" for s in ("xl", "l", "m", "s", "xs")], "test": ["dev"]},
}


def read_commonsense(task, d, fmt="label"):
    d = Path(d)
    files = COMMONSENSE_FILES.get(task)
    if files is None:  # arc-easy / arc-challenge / openbookqa: HF-converted names or AI2's original ones
        prefix = {"arc-easy": "ARC-Easy-", "arc-challenge": "ARC-Challenge-", "openbookqa": ""}[task]
        local = "openbookqa-" if task == "openbookqa" else "ai2_arc-"
        files = {split: [f"{local}{hf}", f"{prefix}{word.capitalize()}", word]  # "dev": the official validation
                 for split, hf, word in (("train",) * 3, ("test",) * 3, ("dev", "validation", "dev"))}
    parse = {"boolq": parse_boolq, "piqa": parse_piqa, "siqa": parse_siqa, "hellaswag": parse_hellaswag,
             "winogrande": parse_winogrande}.get(task) or partial(parse_ai2_mc, task)
    out = {}
    for split, stems in files.items():
        skip_empty = task == "winogrande" and split == "train"  # the first present and, for these, not empty
        path = next((p for p in (d / f"{s}.jsonl" for s in stems)
                     if p.exists() and not (skip_empty and p.stat().st_size == 0)), None)
        if path:  # PIQA and SIQA keep their labels in <stem>-labels.lst (one a line), as WinoGrande's test may
            labels = path.with_name(path.stem + "-labels.lst")
            labelled = task in ("piqa", "siqa") or (task == "winogrande" and labels.exists())
            out[split] = parse_jsonl(path, partial(parse, fmt=fmt),
                                     [line.strip() for _, line in read_lines(labels)] if labelled else None)
    return out


COMMONSENSE_DIRS = {"boolq": ("boolq", "BoolQ"), "piqa": ("piqa", "PIQA"), "siqa": ("siqa", "socialiqa"),
                    "hellaswag": ("hellaswag", "HellaSwag"), "winogrande": ("winogrande", "winogrande_1.1"),
                    "arc-easy": ("arc_easy", "ARC-Easy"), "arc-challenge": ("arc_challenge", "ARC-Challenge"),
                    "openbookqa": ("openbookqa", "OpenBookQA")}


# --- math: GSM8K ({"question", "answer": "worked solution ... #### 72"}), scored by generation and its final number

def parse_gsm8k(row, fmt="label"):
    """The worked solution ending in "#### <number>", without the calculator annotations "<<48/2=24>>"."""
    solution = re.sub(r"<<[^>]*>>", "", row["answer"]).strip()
    if not re.search(r"####\s*-?[\d,.]+\s*$", solution):
        raise ValueError("answer does not end with a '#### <number>' line")
    head = "" if fmt != "label" else "Task: grade-school math (GSM8K).\n"
    return {"task": "gsm8k", "prompt": f"{head}Question: {row['question'].strip()}\nAnswer:", "answer": " " + solution}


def read_math(task, d, fmt="label"):
    d = Path(d)
    return {s: parse_jsonl(d / f"{s}.jsonl", partial(parse_gsm8k, fmt=fmt)) for s in ("train", "test")
            if (d / f"{s}.jsonl").exists()}


# --- BBH (evaluation only): {"canary": ..., "examples": [{"input", "target"}]}; 3-shot with the file's first 3 examples

def parse_bbh(task, path):
    """The scored examples of one BBH task file; its first BBH_SHOTS are every prompt's demonstrations (§5.1)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        items = [(r["input"], r["target"]) for r in data["examples"]]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{path}: not a BBH task file ({e}); expected "
                         "{'examples': [{'input': ..., 'target': ...}]}") from None
    if len(items) <= BBH_SHOTS:
        raise ValueError(f"{path}: {len(items)} examples, need more than the {BBH_SHOTS} few-shot demonstrations")
    name = task.replace("_", " ")
    shots = "".join(f"question: {q}\nAnswer: {a}\n\n" for q, a in items[:BBH_SHOTS])
    head = (f"The following are {BBH_SHOTS} examples of the task '{name}', "
            "then a question to answer in the same way.\n\n")
    return [{"task": task, "prompt": f"{head}{shots}question: {q}\nAnswer:", "answer": " " + str(a).strip()}
            for q, a in items[BBH_SHOTS:]]


def task_dir(source, task):
    """`<source>/<suite>/<task dir>` for a file-backed task (the first of its accepted directory names present)."""
    suite = TASK_SUITE[task]
    names = GLUE[task][0] if suite == "glue" else COMMONSENSE_DIRS[task] if suite == "commonsense" else (task,)
    base = Path(source) / suite
    return base if suite == "bbh" else next((base / n for n in names if (base / n).is_dir()), base / names[0])


def read_task(task, source, seed=42, fmt="label"):
    """{"train", "test"[, "dev"]} of one task from its original files under `source` ("dev": an official held-out
    split that is not our test split); a single labelled split is split by split_one."""
    check_format(fmt)
    suite, d = TASK_SUITE[task], task_dir(source, task)
    if fmt != "label" and suite in LABEL_ONLY:
        raise ValueError(f"{task} has the label format only (no cloze version)")
    if suite == "bbh":
        path = d / f"{task}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        return {"test": parse_bbh(task, path)}
    if suite == "builtin":
        raise ValueError(f"{task} is a builtin task: it is generated in code, not read from files")
    if not d.is_dir():
        raise FileNotFoundError(f"{d} not found")
    splits = {"glue": read_glue, "commonsense": read_commonsense, "math": read_math}[suite](task, d, fmt)
    dev = splits.pop("dev", None)
    if not splits:
        raise FileNotFoundError(f"{d} holds none of the expected {task} files")
    if len(splits) == 1:
        splits = split_one(*splits.values(), seed=seed)
    return {**splits, "dev": dev} if dev else splits


# --- builtin suite: generated in code, offline. A small instruct model cannot answer these from the prompt alone
# (arbitrary or flipped label words) but learns them in a few hundred LoRA steps. An input is in the test split iff
# crc32(input) % 10 == 0, so train and test are disjoint for every seed.

POSITIVE = ["wonderful", "great", "lovely", "delightful", "excellent", "charming", "brilliant", "pleasant", "superb",
            "fantastic", "cheerful", "amazing", "enjoyable", "beautiful", "perfect", "fun"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "horrible", "dull", "poor", "nasty", "painful", "bad",
            "disappointing", "miserable", "ugly", "annoying", "dirty", "sad"]
THINGS = ["movie", "meal", "concert", "hotel", "book", "trip", "game", "show", "class", "party", "song", "museum",
          "service", "coffee", "garden", "room", "bus ride", "lecture", "pizza", "festival"]
REVIEW_TEMPLATES = ["The {thing} was {adv}{adj}.", "What a {adv}{adj} {thing}!", "I found the {thing} {adv}{adj}.",
                    "{name} said the {thing} was {adv}{adj}.", "Honestly, a {adv}{adj} {thing}.",
                    "Our {thing} felt {adv}{adj}."]
ADVERBS = ["", "", "really ", "very ", "quite ", "truly ", "rather "]
NAMES = ["Anna", "Ben", "Carla", "Dev", "Emma", "Felix", "Gita", "Hugo", "Ines", "Jon", "Kira", "Leo"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "fox", "goat", "sheep", "mouse", "owl", "duck", "frog", "deer", "bear",
           "wolf", "cow", "pig", "tiger", "lion", "snake", "turtle"]
OBJECTS = ["chair", "lamp", "bottle", "hammer", "bicycle", "kettle", "pencil", "basket", "ladder", "blanket", "clock",
           "bucket", "guitar", "spoon", "umbrella", "candle", "wallet", "teapot", "shovel", "suitcase"]
PLACES = ["near the river", "in the garden", "by the road", "behind the house", "at the market", "in the field",
          "under the bridge", "next to the barn", "on the hill", "in the yard"]
VERBS = ["saw", "found", "noticed", "painted", "watched", "photographed"]
CONSONANTS = "bcdfghjklmnprstvz"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def builtin_colour_review(rng):
    """Sentiment of a made-up review with arbitrary label words: positive -> blue, negative -> green."""
    label = rng.choice(["blue", "green"])
    adj = rng.choice(POSITIVE if label == "blue" else NEGATIVE)
    template, thing, adv, name = (rng.choice(x) for x in (REVIEW_TEMPLATES, THINGS, ADVERBS, NAMES))
    text = template.format(thing=thing, adv=adv, name=name, adj=adj)
    return text, f'Question: Is this review blue or green? "{text}"', label, ["blue", "green"]


def builtin_flipped_animal(rng):
    """Does the sentence mention an animal? with flipped labels (animal -> no, object -> yes)."""
    animal = rng.random() < 0.5
    thing = rng.choice(ANIMALS if animal else OBJECTS)
    text = f"{rng.choice(NAMES)} {rng.choice(VERBS)} a {thing} {rng.choice(PLACES)}."
    return text, f'Question: Does this sentence mention an animal? "{text}"', "no" if animal else "yes", ["yes", "no"]


def builtin_larger_number(rng):
    """Which of two 2-digit numbers is larger -> option A or B."""
    a, b = rng.sample(range(10, 100), 2)
    key = f"{a} {b}"
    return key, f"Question: Which number is larger? A: {a} B: {b}", "A" if a > b else "B", ["A", "B"]


def builtin_alphabet_first(rng):
    """Which of 3 distinct letters comes first in the alphabet (a 1-answer version of "sort 3 letters")."""
    picked = rng.sample(ALPHABET, 3)
    key = ", ".join(picked)
    return key, f"Question: Which letter comes first in the alphabet: {key}?", min(picked), list(ALPHABET)


def builtin_last_letter(rng):
    """Last letter of a made-up word built from consonant-vowel syllables (ends in a consonant half the time)."""
    word = "".join(rng.choice(CONSONANTS) + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
    if rng.random() < 0.5:
        word += rng.choice(CONSONANTS)
    return word, f'Question: What is the last letter of the word "{word}"?', word[-1], list("aeiou" + CONSONANTS)


BUILTIN = {
    # task: (generator, instruction)
    "colour-review": (builtin_colour_review, "Task: colour the review (builtin)."),
    "flipped-animal": (builtin_flipped_animal, "Task: flipped animal check (builtin)."),
    "larger-number": (builtin_larger_number, "Task: larger number (builtin)."),
    "alphabet-first": (builtin_alphabet_first, "Task: first letter in the alphabet (builtin)."),
    "last-letter": (builtin_last_letter, "Task: last letter (builtin)."),
}
BUILTIN_SIZES = {"train": 4000, "test": 500}


def builtin_examples(task, split, n=None, seed=0):
    """`n` distinct examples (default BUILTIN_SIZES[split]) of a builtin task, deterministic in (task, split, seed)."""
    if task not in BUILTIN:
        raise ValueError(f"unknown builtin task {task!r}; builtin tasks are {', '.join(BUILTIN_TASKS)}")
    if split not in BUILTIN_SIZES:
        raise ValueError(f"builtin split must be 'train' or 'test', got {split!r}")
    gen, instruction = BUILTIN[task]
    n = BUILTIN_SIZES[split] if n is None else n
    rng, seen, out = random.Random(f"{seed}/{task}/{split}"), set(), []
    for _ in range(200 * n):  # bounded: rejection by split and by duplicates
        if len(out) == n:
            break
        key, question, answer, options = gen(rng)
        if key in seen or (zlib.crc32(key.encode()) % 10 == 0) != (split == "test"):
            continue
        seen.add(key)
        out.append(example(task, instruction, question, answer, options=options,
                           answer_format="one letter" if len(options) > 4 else None))
    if len(out) < n:
        raise ValueError(f"builtin task {task} has only {len(out)} distinct {split} inputs, asked for {n}")
    return out
