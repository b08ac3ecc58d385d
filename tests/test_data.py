"""Multi-task data: original-format parsers, task loading, answer-only tokenisation, balanced batches, scoring.

Parsers are checked on tiny fixtures written here in each benchmark's original layout (as described in
shared/data/SOURCES.md); when shared/data is present, every real file is parsed once as a smoke test.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoalign.data import IGNORE_INDEX, BalancedBatcher, encode_example, encode_tasks, extract_answer, left_pad, \
    listed_options
from nanoalign.plumbing import tasks as T
from nanoalign.plumbing.datasets import check_example, load_tasks, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NANOALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class ByteTok:
    """A fake byte-level tokenizer with the nanoalign Tokenizer interface: id = byte + 3, pad 0, eos 1."""
    pad_id, eos_id, bos_id, max_token_chars = 0, 1, None, 1

    def encode(self, text):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# GLUE tsv

def test_glue_every_task_parses_original_tsv(tmp_path):
    """Each GLUE task's train/dev tsv (header by name, CoLA without header, MRPC with a BOM, MNLI's many columns and
    dev_matched) gives the paper's label words; unbalanced quotes stay inside their field (no CSV quoting)."""
    g = tmp_path / "glue"
    write(g / "sst2/train.tsv", 'sentence\tlabel\nit \'s a " charming journey . \t1\nunflinchingly bleak \t0\n')
    write(g / "sst2/dev.tsv", "sentence\tlabel\ngood fun \t1\n")
    write(g / "cola/train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe rope stretched the weights over.\n")
    write(g / "cola/dev.tsv", "cl03\t1\t\tBill left.\n")
    mrpc_head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(g / "mrpc/train.tsv", mrpc_head + '1\t1\t2\tHe said " it fits .\tIt fits , he said .\n0\t3\t4\tA cat .\tA dog .\n')
    write(g / "mrpc/dev.tsv", mrpc_head + "0\t5\t6\tRain .\tSun .\n")
    write(g / "qqp/train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow to cook?\tHow do I cook?\t1\n")
    write(g / "qqp/dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t3\t4\tWhy?\tWhen?\t0\n")
    mnli_train = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                  "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    write(g / "mnli/train.tsv", mnli_train + "0\t1\t1e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tA man sleeps.\tA man rests.\tentailment\tentailment\n")
    mnli_dev = mnli_train.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
    write(g / "mnli/dev_matched.tsv", mnli_dev + "0\t2\t2c\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tIt rains.\tIt is dry.\t"
          "contradiction\tcontradiction\tneutral\tcontradiction\tcontradiction\tcontradiction\n")
    write(g / "qnli/train.tsv", "index\tquestion\tsentence\tlabel\n0\tWho won?\tBob won the race.\tentailment\n")
    write(g / "qnli/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWhere?\tIt was blue.\tnot_entailment\n")
    write(g / "rte/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tNo weapons found.\tWeapons found.\tnot_entailment\n")
    write(g / "rte/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tDana died.\tDana is dead.\tentailment\n")
    expect = {"sst2": [" positive", " negative"], "cola": [" acceptable", " unacceptable"], "mrpc": [" equivalent", " different"],
              "qqp": [" duplicate"], "mnli": [" entailment"], "qnli": [" entailment"], "rte": [" not_entailment"]}
    for task, answers in expect.items():
        splits = T.read_task(task, tmp_path)
        assert [ex["answer"] for ex in splits["train"]] == answers, task
        for ex in splits["train"] + splits["test"]:
            assert check_example(ex) is None and ex["prompt"].endswith("\nAnswer:") and ex["task"] == task
    assert T.read_task("mnli", tmp_path)["test"][0]["answer"] == " contradiction"
    assert T.read_task("mnli", tmp_path)["test"][0]["options"] == [" entailment", " neutral", " contradiction"]
    assert '"it \'s a " charming journey ."' in T.read_task("sst2", tmp_path)["train"][0]["prompt"]
    assert '"He said " it fits ."' in T.read_task("mrpc", tmp_path)["train"][0]["prompt"]
    assert "The rope stretched the weights over." in T.read_task("cola", tmp_path)["train"][1]["prompt"]


def test_glue_unlabelled_test_files_and_bad_rows(tmp_path):
    """GLUE test.tsv files (no label column; CoLA's has a header there) parse to prompts without an answer; a row with
    too few columns or an unknown label names the file and line."""
    rows = T.parse_glue("sst2", write(tmp_path / "t1.tsv", "index\tsentence\n0\tuneasy mishmash of styles \n"))
    assert "answer" not in rows[0] and "uneasy mishmash of styles" in rows[0]["prompt"]
    rows = T.parse_glue("cola", write(tmp_path / "t2.tsv", "index\tsentence\n0\tBill whistled past the house.\n"))
    assert "answer" not in rows[0] and "Bill whistled" in rows[0]["prompt"]
    rows = T.parse_glue("qnli", write(tmp_path / "t3.tsv", "index\tquestion\tsentence\n0\tWho?\tBob did.\n"))
    assert "answer" not in rows[0]
    bad = write(tmp_path / "bad.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA\tB\tentailment\n1\tonly one\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:3: expected 4"):
        T.parse_glue("rte", bad)
    bad = write(tmp_path / "bad2.tsv", "sentence\tlabel\nfine \t7\n")
    with pytest.raises(ValueError, match=r"bad2\.tsv:2: unknown sst2 label '7'"):
        T.parse_glue("sst2", bad)


def test_mrpc_rebuilt_from_msr_release(tmp_path):
    """Without train.tsv, MRPC train/dev are rebuilt from msr_paraphrase_train.txt + dev_ids.tsv (GLUE's recipe)."""
    d = tmp_path / "glue" / "mrpc"
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(d / "msr_paraphrase_train.txt", head + "1\t10\t11\tA .\tA !\n0\t12\t13\tB .\tC .\n1\t14\t15\tD .\tD !\n")
    write(d / "dev_ids.tsv", "12\t13\n")
    splits = T.read_task("mrpc", tmp_path)
    assert [ex["answer"] for ex in splits["train"]] == [" equivalent", " equivalent"]
    assert [ex["answer"] for ex in splits["test"]] == [" different"]


# ----------------------------------------------------------------------------------------------------------------
# commonsense

def test_boolq_single_split_is_split_deterministically(tmp_path):
    """BoolQ (JSON true/false answers): with only dev.jsonl, the rows are split 90/10, disjoint, reproducibly."""
    rows = [{"question": f"is {i} even", "title": "t", "answer": i % 2 == 0, "passage": f"Passage {i}."} for i in range(40)]
    write(tmp_path / "commonsense/boolq/dev.jsonl", jsonl(rows))
    a, b = T.read_task("boolq", tmp_path), T.read_task("boolq", tmp_path)
    assert a == b and len(a["test"]) == 4 and len(a["train"]) == 36
    prompts = [ex["prompt"] for ex in a["train"] + a["test"]]
    assert len(set(prompts)) == 40
    ex = next(ex for ex in a["train"] + a["test"] if "Passage 3." in ex["prompt"])
    assert ex["answer"] == " false" and "Question: is 3 even?" in ex["prompt"] and ex["options"] == [" true", " false"]
    write(tmp_path / "commonsense/boolq/train.jsonl", jsonl([{"question": "q", "answer": "yes", "passage": "p"}]))
    with pytest.raises(ValueError, match=r"train\.jsonl:1: 'answer' should be a JSON true/false"):
        T.read_task("boolq", tmp_path)


def test_piqa_siqa_with_label_lists(tmp_path):
    """PIQA (0/1 -> solution1/2) and SIQA (1/2/3 -> answer1/2/3) take labels from *-labels.lst lined up by row;
    a length mismatch is an error naming the file."""
    d = tmp_path / "commonsense"
    piqa = [{"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid"}, {"goal": "g2", "sol1": "a", "sol2": "b"}]
    write(d / "piqa/train.jsonl", jsonl(piqa))
    write(d / "piqa/train-labels.lst", "0\n1\n")
    write(d / "piqa/valid.jsonl", jsonl(piqa[:1]))
    write(d / "piqa/valid-labels.lst", "1\n")
    s = T.read_task("piqa", tmp_path)
    assert [ex["answer"] for ex in s["train"]] == [" solution1", " solution2"] and s["test"][0]["answer"] == " solution2"
    assert "Solution1: Twist the lid\nSolution2: Eat the lid" in s["train"][0]["prompt"]
    siqa = [{"context": "Tracy stayed.", "question": "Why?", "answerA": "x", "answerB": "y", "answerC": "z"}]
    write(d / "siqa/train.jsonl", jsonl(siqa * 2))
    write(d / "siqa/train-labels.lst", "3\n1\n")
    write(d / "siqa/dev.jsonl", jsonl(siqa))
    write(d / "siqa/dev-labels.lst", "2\n")
    s = T.read_task("siqa", tmp_path)
    assert [ex["answer"] for ex in s["train"]] == [" answer3", " answer1"] and s["test"][0]["answer"] == " answer2"
    assert s["test"][0]["options"] == [" answer1", " answer2", " answer3"]
    write(d / "siqa/dev-labels.lst", "2\n3\n")
    with pytest.raises(ValueError, match=r"dev\.jsonl: 1 rows but 2 labels"):
        T.read_task("siqa", tmp_path)


def test_winogrande_v11_uses_largest_train_size(tmp_path):
    """WinoGrande v1.1: answer "1"/"2" -> option1/option2; only the largest train_<size> file is read (the sizes are
    nested subsets); labels come from *-labels.lst when a row has no answer."""
    d = tmp_path / "commonsense/winogrande"
    row = {"qID": "q1", "sentence": "The trophy didn't fit because _ was big.", "option1": "trophy", "option2": "suitcase"}
    write(d / "train_xs.jsonl", jsonl([{**row, "answer": "1"}]))
    write(d / "train_xl.jsonl", jsonl([{**row, "answer": "1"}, {**row, "qID": "q2", "answer": "2"}]))
    write(d / "dev.jsonl", jsonl([row]))
    write(d / "dev-labels.lst", "2\n")
    s = T.read_task("winogrande", tmp_path)
    assert [ex["answer"] for ex in s["train"]] == [" option1", " option2"] and s["test"][0]["answer"] == " option2"
    assert "blank _ in: The trophy" in s["train"][0]["prompt"] and "Option2: suitcase" in s["train"][0]["prompt"]
    write(d / "train_xl.jsonl", "")  # a truncated download: the next size down is read instead
    assert [ex["answer"] for ex in T.read_task("winogrande", tmp_path)["train"]] == [" option1"]


def test_hellaswag_original_jsonl(tmp_path):
    """HellaSwag's original jsonl (ctx, endings, integer label): label 2 -> ending3; '[title]' markup removed."""
    d = tmp_path / "commonsense/hellaswag"
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes.", "ctx_b": "then",
           "ctx": "Then, the man writes over the snow [title] then", "split": "train", "split_type": "indomain",
           "endings": ["e1", "e2 [step] more", "e3", "e4"], "label": 2, "source_id": "x"}
    write(d / "hellaswag_train.jsonl", jsonl([row]))
    write(d / "hellaswag_val.jsonl", jsonl([{**row, "label": 0}]))
    s = T.read_task("hellaswag", tmp_path)
    ex = s["train"][0]
    assert ex["answer"] == " ending3" and s["test"][0]["answer"] == " ending1" and len(ex["options"]) == 4
    assert "Removing ice from car: Then, the man writes over the snow. then" in ex["prompt"]
    assert "Ending2: e2 more" in ex["prompt"] and "[" not in ex["prompt"]


def test_arc_and_openbookqa_both_layouts_and_digit_keys(tmp_path):
    """ARC/OBQA in the HF-converted layout (choices {text,label}, question_stem) and AI2's original layout
    (question {stem, choices}); digit answer keys '1'..'4' are looked up by position and answered with a letter."""
    d = tmp_path / "commonsense"
    arc = [{"id": "a", "question": "Which is a metal?", "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]},
            "answerKey": "B"},
           {"id": "b", "question": "Pick four.", "choices": {"text": ["1", "2", "3", "4"], "label": ["1", "2", "3", "4"]},
            "answerKey": "4"}]
    write(d / "arc_easy/ai2_arc-train.jsonl", jsonl(arc))
    write(d / "arc_easy/ai2_arc-test.jsonl", jsonl(arc[:1]))
    s = T.read_task("arc-easy", tmp_path)
    assert [ex["answer"] for ex in s["train"]] == [" B", " D"]
    assert s["train"][0]["options"] == [" A", " B", " C"] and "A: wood\nB: iron\nC: glass" in s["train"][0]["prompt"]
    assert s["train"][1]["options"] == [" A", " B", " C", " D"] and "Answer format: A/B/C/D" in s["train"][1]["prompt"]
    orig = {"id": "c", "question": {"stem": "Sun is a", "choices": [{"text": "star", "label": "A"}, {"text": "moon", "label": "B"}]},
            "answerKey": "A"}
    write(d / "arc_challenge/ARC-Challenge-Train.jsonl", jsonl([orig]))
    write(d / "arc_challenge/ARC-Challenge-Test.jsonl", jsonl([{**orig, "answerKey": "B"}]))
    s = T.read_task("arc-challenge", tmp_path)
    assert s["train"][0]["answer"] == " A" and s["test"][0]["answer"] == " B" and "Question: Sun is a" in s["train"][0]["prompt"]
    obqa = {"id": "7", "question_stem": "The sun is responsible for",
            "choices": {"text": ["a", "b", "c", "plants growing"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
    write(d / "openbookqa/openbookqa-train.jsonl", jsonl([obqa]))
    write(d / "openbookqa/openbookqa-test.jsonl", jsonl([{**obqa, "answerKey": "E"}]))
    with pytest.raises(ValueError, match=r"openbookqa-test\.jsonl:1: answerKey 'E' is not one of"):
        T.read_task("openbookqa", tmp_path)
    write(d / "openbookqa/openbookqa-test.jsonl", jsonl([{k: v for k, v in obqa.items() if k != "choices"}]))
    with pytest.raises(ValueError, match=r"openbookqa-test\.jsonl:1: missing key 'choices'"):
        T.read_task("openbookqa", tmp_path)


def test_bbh_three_shots_excluded_from_scoring(tmp_path):
    """BBH json: the first 3 examples are the demonstrations of every prompt and are never scored themselves."""
    items = [{"input": f"q{i} is", "target": f"a{i}"} for i in range(6)]
    write(tmp_path / "bbh/web_of_lies.json", json.dumps({"canary": "BENCHMARK DATA SHOULD NEVER APPEAR", "examples": items}))
    s = T.read_task("web_of_lies", tmp_path)
    assert list(s) == ["test"] and [ex["answer"] for ex in s["test"]] == [" a3", " a4", " a5"]
    p = s["test"][0]["prompt"]
    assert p.count("question: ") == 4 and "question: q0 is\nAnswer: a0\n\n" in p and p.endswith("question: q3 is\nAnswer:")
    assert all("q1 is" in ex["prompt"] and "q4" not in s["test"][0]["prompt"] for ex in s["test"])
    write(tmp_path / "bbh/snarks.json", json.dumps({"examples": items[:3]}))
    with pytest.raises(ValueError, match="need more than the 3 few-shot"):
        T.read_task("snarks", tmp_path)
    with pytest.raises(FileNotFoundError):
        T.read_task("navigate", tmp_path)


def test_missing_task_directory_is_skipped_cleanly(tmp_path):
    """A task without its directory (MNLI, QQP, HellaSwag, WinoGrande in shared/data) raises FileNotFoundError."""
    for task in ("mnli", "qqp", "hellaswag", "winogrande"):
        with pytest.raises(FileNotFoundError, match="not found"):
            T.read_task(task, tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
def test_real_shared_files_parse():
    """Smoke parse of every real file in shared/data, in both formats: known row counts (the same in both), every
    example well-formed."""
    counts = {}
    for task in T.GLUE_TASKS + T.COMMONSENSE_TASKS + T.MATH_TASKS + T.BBH_TASKS:
        for fmt in ("label",) if task in T.BBH_TASKS else T.FORMATS:
            try:
                splits = T.read_task(task, SHARED, fmt=fmt)
            except FileNotFoundError:
                assert task in ("mnli", "qqp", "hellaswag"), task
                continue
            got = {s: len(rows) for s, rows in splits.items()}
            assert counts.setdefault(task, got) == got, task
            for rows in splits.values():
                assert rows and all(check_example(ex) is None and ex["task"] == task for ex in rows), (task, fmt)
    assert counts["sst2"] == {"train": 67349, "test": 872} and counts["cola"] == {"train": 8551, "test": 1043}
    assert counts["mrpc"] == {"train": 3667, "test": 408, "dev": 1725} and counts["rte"] == {"train": 2490, "test": 277}
    assert sum(counts["qnli"].values()) == 5463 and sum(counts["boolq"].values()) == 3270
    assert counts["piqa"] == {"train": 16113, "test": 1838} and counts["siqa"] == {"train": 33410, "test": 1954}
    assert counts["arc-easy"] == {"train": 2251, "test": 2376, "dev": 570}
    assert counts["arc-challenge"] == {"train": 1119, "test": 1172, "dev": 299}
    assert counts["openbookqa"] == {"train": 4957, "test": 500, "dev": 500}
    assert counts["winogrande"] == {"train": 10234, "test": 1267} and counts["gsm8k"] == {"train": 7473, "test": 1319}
    assert len([t for t in T.BBH_TASKS if t in counts]) == 27
    assert sum(c["test"] for t, c in counts.items() if t in T.BBH_TASKS) == 6511 - 27 * 3


# ----------------------------------------------------------------------------------------------------------------
# prepare.py and load_tasks

def test_prepare_script_writes_jsonl_and_load_tasks_reads_it(tmp_path):
    """data/prepare.py on a fixture source writes <suite>/<task>-<split>.jsonl, skips tasks without files, and
    load_tasks reads the suite back (left-out tasks noted), a comma list, and a JSONL path."""
    src = tmp_path / "src"
    write(src / "glue/rte/train.tsv", "index\tsentence1\tsentence2\tlabel\n" +
          "".join(f"{i}\tA{i}.\tB{i}.\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(6)))
    write(src / "glue/rte/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tX.\tY.\tentailment\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "data/prepare.py"), "glue", "--source", str(src), "--out", str(out),
                        "--tasks", "rte,mnli"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skip mnli" in r.stdout and (out / "glue/rte-train.jsonl").exists() and (out / "glue/rte-test.jsonl").exists()
    assert len(read_jsonl(out / "glue/rte-train.jsonl")) == 6
    got = load_tasks("glue", "train", data_dir=out)
    assert list(got) == ["rte"] and len(got["rte"]) == 6
    assert load_tasks("rte", "test", data_dir=out)["rte"][0]["answer"] == " entailment"
    assert len(load_tasks(str(out / "glue/rte-train.jsonl"), "train")["rte"]) == 6
    r = subprocess.run([sys.executable, str(REPO / "data/prepare.py"), "glue", "--source", str(tmp_path / "nothing"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pass --source DIR" in r.stderr


def test_prepare_download_unpacks_original_archives(tmp_path, monkeypatch):
    """prepare.download fetches a task's original files (here file:// URLs) and unpacks a zip flat into the task
    directory, keeping only the members the task needs; a failing URL raises OSError (main turns it into one line)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("prepare", REPO / "data/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    import zipfile
    head = "index\tsentence1\tsentence2\tgold_label\n"
    with zipfile.ZipFile(tmp_path / "MNLI.zip", "w") as z:
        z.writestr("MNLI/train.tsv", head + "0\tA.\tB.\tneutral\n")
        z.writestr("MNLI/dev_matched.tsv", head + "0\tC.\tD.\tentailment\n")
        z.writestr("README.txt", "not part of MNLI/")
    monkeypatch.setitem(prepare.URLS, "mnli", [(tmp_path / "MNLI.zip").as_uri()])
    src = tmp_path / "src"
    prepare.download("mnli", src)
    assert sorted(os.listdir(src / "glue/mnli")) == ["dev_matched.tsv", "train.tsv"]
    assert T.read_task("mnli", src)["train"][0]["answer"] == " neutral"
    monkeypatch.setitem(prepare.URLS, "rte", [(tmp_path / "missing.zip").as_uri()])
    with pytest.raises(OSError):
        prepare.download("rte", src)


def test_load_tasks_builtin_default_and_options():
    """The default spec is the builtin suite (no files); keys are sorted task names; max_per_task subsamples
    deterministically in seed; a comma list mixes suites' task names."""
    tr = load_tasks()
    assert list(tr) == sorted(T.BUILTIN_TASKS) and all(len(v) == T.BUILTIN_SIZES["train"] for v in tr.values())
    a = load_tasks("builtin", "train", max_per_task=50, seed=1)
    b = load_tasks("builtin", "train", max_per_task=50, seed=1)
    c = load_tasks("builtin", "train", max_per_task=50, seed=2)
    assert a == b and a != c and all(len(v) == 50 for v in a.values())
    assert all(ex in tr[t] for t in a for ex in a[t])
    assert list(load_tasks("last-letter,colour-review", "test")) == ["colour-review", "last-letter"]


def test_load_tasks_errors(tmp_path):
    """Unknown task, missing prepared file (with the prepare command), bbh train, malformed rows (file:line:problem)
    and empty tasks are clear errors."""
    with pytest.raises(ValueError, match="unknown task nope"):
        load_tasks("sst2,nope", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python data/prepare.py glue --source DIR --tasks sst2"):
        load_tasks("sst2", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python data/prepare.py commonsense --source DIR"):
        load_tasks("commonsense", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="evaluation-only"):
        load_tasks("bbh", "train", data_dir=tmp_path)
    good = {"task": "x", "prompt": "p\nAnswer:", "answer": " a", "options": [" a", " b"]}
    cases = {"not valid JSON": "{oops\n", "missing key 'answer'": json.dumps({"task": "x", "prompt": "p"}) + "\n",
             "is not one of the options": json.dumps({**good, "answer": " c"}) + "\n",
             "'prompt' must be a non-empty string": json.dumps({**good, "prompt": ""}) + "\n"}
    for problem, bad_line in cases.items():
        f = write(tmp_path / "m.jsonl", json.dumps(good) + "\n\n" + bad_line)
        with pytest.raises(ValueError, match=rf"m\.jsonl:3: .*{re.escape(problem)}"):
            load_tasks(str(f))
    write(tmp_path / "glue/rte-train.jsonl", "")
    with pytest.raises(ValueError, match="task 'rte' has no train examples"):
        load_tasks("rte", data_dir=tmp_path)
    write(tmp_path / "glue/rte-train.jsonl", json.dumps({**good, "task": "sst2"}) + "\n")
    with pytest.raises(ValueError, match="file for task 'rte' holds a row of task 'sst2'"):
        load_tasks("rte", data_dir=tmp_path)
    write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_tasks(str(tmp_path / "empty.jsonl"))


def test_write_jsonl_roundtrip_is_atomic(tmp_path):
    """write_jsonl leaves no temp file behind and read_jsonl returns the same rows (unicode kept)."""
    rows = [{"task": "t", "prompt": "é\nAnswer:", "answer": " ü"}]
    write_jsonl(tmp_path / "a/b.jsonl", rows)
    assert read_jsonl(tmp_path / "a/b.jsonl") == rows and os.listdir(tmp_path / "a") == ["b.jsonl"]


def test_read_jsonl_names_the_line_that_is_not_utf8(tmp_path):
    """A file saved in Latin-1 (é as byte 0xe9 on its 3rd line) is a ValueError naming the file, the line and the
    byte; a UTF-8 byte-order mark at the start is accepted."""
    good = json.dumps({"task": "t", "prompt": "café\nAnswer:", "answer": " ü"}, ensure_ascii=False)
    f = tmp_path / "latin1.jsonl"
    f.write_bytes((good + "\n\n").encode() + good.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"latin1\.jsonl:3: not UTF-8 text \(byte 0xe9 at column \d+\); save"):
        read_jsonl(f)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")
    assert read_jsonl(tmp_path / "bom.jsonl")[0]["prompt"] == "café\nAnswer:"


# ----------------------------------------------------------------------------------------------------------------
# builtin tasks

def test_builtin_tasks_deterministic_disjoint_and_correct():
    """Builtin tasks: same examples on every call, distinct seeds differ, train/test share no prompt, answers are
    options, labels roughly balanced, and every answer obeys the task's rule recomputed from the prompt."""
    for task in T.BUILTIN_TASKS:
        train, test = T.builtin_examples(task, "train"), T.builtin_examples(task, "test")
        assert train == T.builtin_examples(task, "train") and train[:50] != T.builtin_examples(task, "train", 50, seed=1)
        assert len({ex["prompt"] for ex in train}) == len(train) == 4000 and len(test) == 500
        assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in test}
        for ex in train[:300] + test:
            assert check_example(ex) is None and ex["prompt"].endswith("\nAnswer:") and len(ex["prompt"]) < 180
            q = ex["prompt"].split("\n")[1]
            if task == "colour-review":
                positive = any(re.search(rf"\b{w}\b", q) for w in T.POSITIVE)
                assert ex["answer"] == (" blue" if positive else " green")
            elif task == "flipped-animal":
                animal = any(re.search(rf"\ba {w}\b", q) for w in T.ANIMALS)
                assert ex["answer"] == (" no" if animal else " yes")
            elif task == "larger-number":
                a, b = map(int, re.search(r"A: (\d+) B: (\d+)", q).groups())
                assert ex["answer"] == (" A" if a > b else " B")
            elif task == "alphabet-first":
                letters = re.search(r"alphabet: (\w), (\w), (\w)\?", q).groups()
                assert len(set(letters)) == 3 and ex["answer"] == " " + min(letters)
            elif task == "last-letter":
                assert ex["answer"] == " " + re.search(r'"(\w+)"', q).group(1)[-1]
        answers = [ex["answer"] for ex in train]
        top = max(answers.count(a) for a in set(answers))
        assert top < 0.6 * len(answers) if len(train[0]["options"]) == 2 else top < 0.4 * len(answers)


# ----------------------------------------------------------------------------------------------------------------
# tokenisation

def test_encode_example_loss_mask_and_truncation():
    """input_ids = prompt + answer + eos; labels are -100 exactly on the prompt and equal the ids on answer + eos;
    over max_len the prompt loses its left end and the answer stays whole; ids are Python ints."""
    tok, ex = ByteTok(), {"task": "t", "prompt": "Say hi.\nAnswer:", "answer": " hi"}
    ids, labels = encode_example(tok, ex, max_len=64)
    p, a = tok.encode(ex["prompt"]), tok.encode(ex["answer"])
    assert ids == p + a + [tok.eos_id] and all(type(i) is int for i in ids)
    assert labels == [IGNORE_INDEX] * len(p) + a + [tok.eos_id]
    ids, labels = encode_example(tok, ex, max_len=10)
    assert len(ids) == 10 and ids[-4:] == a + [tok.eos_id] and tok.decode(ids[:6]) == "nswer:"
    assert labels[:6] == [IGNORE_INDEX] * 6 and labels[6:] == ids[6:]
    with pytest.raises(ValueError, match="raise max_len"):
        encode_example(tok, ex, max_len=4)


def test_left_pad_for_generation():
    """left_pad right-aligns prompts: int64 ids, bool mask True exactly on the real tokens."""
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]


# ----------------------------------------------------------------------------------------------------------------
# balanced batches

def rows_of(batch):
    """(task id, example index) of each row, read back from the ids."""
    return [(int(r[0]) - 100, int(r[1])) for r in batch["input_ids"]]


def make_encoded(sizes):
    return {name: [([100 + t, i] + [7] * (i % 3), [IGNORE_INDEX, i] + [7] * (i % 3)) for i in range(n)]
            for t, (name, n) in enumerate(sorted(sizes.items()))}


def test_balanced_batches_shapes_padding_and_epochs():
    """Every micro-batch holds exactly k rows of every task in sorted-name order with matching task ids; right
    padding with mask False and labels -100 there; each task's examples are drawn without replacement within an
    epoch and reshuffled for the next."""
    enc = make_encoded({"b": 6, "a": 10, "c": 4})
    batcher = BalancedBatcher(enc, per_task=2, seed=0, pad_id=0)
    seen = {0: [], 1: [], 2: []}
    for _ in range(6):
        b = next(batcher)
        assert b["input_ids"].dtype == b["labels"].dtype == b["task_ids"].dtype == torch.int64
        assert b["attention_mask"].dtype == torch.bool and b["input_ids"].shape == b["labels"].shape == (6, 4)
        assert b["task_ids"].tolist() == [0, 0, 1, 1, 2, 2] and [t for t, _ in rows_of(b)] == [0, 0, 1, 1, 2, 2]
        for r, (t, i) in enumerate(rows_of(b)):
            n = 2 + i % 3
            assert b["attention_mask"][r].tolist() == [True] * n + [False] * (4 - n)
            assert (b["labels"][r, n:] == IGNORE_INDEX).all() and (b["input_ids"][r, n:] == 0).all()
            seen[t].append(i)
    assert sorted(seen[0][:10]) == list(range(10))  # task a: 10 examples, 6 batches of 2 = one epoch and a bit
    for t, n in ((1, 6), (2, 4)):  # tasks b and c: exactly 2 and 3 epochs, each a fresh permutation
        epochs = [seen[t][i:i + n] for i in range(0, 12, n)]
        assert all(sorted(e) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1


def test_balanced_batches_deterministic_and_resume():
    """Same seed -> same stream; another seed differs; state_dict mid-stream (through JSON) then continuing in a new
    batcher equals the uninterrupted stream; a state from other settings is refused."""
    enc = make_encoded({"x": 7, "y": 5})
    full = [rows_of(next(b)) for b in [BalancedBatcher(enc, per_task=2, seed=3)] for _ in range(12)]
    again = BalancedBatcher(enc, per_task=2, seed=3)
    assert [rows_of(next(again)) for _ in range(12)] == full
    other = BalancedBatcher(enc, per_task=2, seed=4)
    assert [rows_of(next(other)) for _ in range(12)] != full
    first = BalancedBatcher(enc, per_task=2, seed=3)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BalancedBatcher(enc, per_task=2, seed=3)
    resumed.load_state_dict(state)
    assert [rows_of(next(resumed)) for _ in range(7)] == full[5:]
    with pytest.raises(ValueError, match="seed"):
        BalancedBatcher(enc, per_task=2, seed=9).load_state_dict(state)


def test_balanced_batches_ddp_ranks_disjoint_and_balanced():
    """With world_size 2, both ranks' micro-batches are k-per-task balanced, and within each task epoch the two ranks
    draw disjoint examples that together cover the task."""
    enc = make_encoded({"p": 8, "q": 12})
    ranks = [BalancedBatcher(enc, per_task=2, seed=1, rank=r, world_size=2) for r in range(2)]
    got = [[rows_of(next(b)) for _ in range(2)] for b in ranks]  # 2 steps x 2 ranks x 2 = 8 = one epoch of "p"
    for r in range(2):
        for rows in got[r]:
            assert [t for t, _ in rows] == [0, 0, 1, 1]
    p = [[i for rows in got[r] for t, i in rows if t == 0] for r in range(2)]
    assert not set(p[0]) & set(p[1]) and sorted(p[0] + p[1]) == list(range(8))
    q = [[i for rows in got[r] for t, i in rows if t == 1] for r in range(2)]
    assert not set(q[0]) & set(q[1])
    with pytest.raises(ValueError, match="fewer than per_task"):
        BalancedBatcher(make_encoded({"p": 3}), per_task=2, world_size=2)


def test_encode_tasks_into_batcher_end_to_end():
    """Builtin examples -> encode_tasks -> BalancedBatcher: labelled positions decode to answer text + eos."""
    tok = ByteTok()
    data = load_tasks("builtin", "train", max_per_task=8)
    b = next(BalancedBatcher(encode_tasks(tok, data, max_len=256), per_task=1, pad_id=tok.pad_id))
    for r, t in enumerate(b["task_ids"].tolist()):
        lab = b["labels"][r][b["labels"][r] != IGNORE_INDEX].tolist()
        assert lab[-1] == tok.eos_id and tok.decode(lab[:-1]) in [o for o in data[sorted(data)[t]][0]["options"]]


# ----------------------------------------------------------------------------------------------------------------
# answer extraction

@pytest.mark.parametrize("generated, gold, correct", [
    (" positive", " positive", True),
    (" Positive.", "positive", True),
    (" negative", " positive", False),
    ("The review is... Answer: positive\nmore text", "positive", True),
    (" not_entailment", "entailment", False),
    (" 24", "24", True),
    (" the result is 24.0 apples", "24", True),
    (" 1,000", "1000", True),
    (" -20", "20", False),
    (" (B) because", "(B)", True),
    (" B", "(B)", True),
    (" A", "(B)", False),
    (" The answer is (C).", "C", True),
    (" D. fourth choice", "D", True),
    (" solution2", "solution2", True),
    (" the correct answer is answer3", "answer3", True),
    (" option 1", "option1", True),
    (" ending1", "ending3", False),
    (" ] ) }", "] ) }", True),
    (" True\n\nquestion: next", "True", True),
    (" False", "True", False),
    (" n", "n", True),
    ("", "yes", False),
])
def test_extract_answer(generated, gold, correct):
    """§5.1 scoring: text after the last "Answer:", numbers as floats, option letters and (X) by regex, solution/answer/
    option/ending labels by number, else first-line exact match lower-cased without periods."""
    assert extract_answer(generated, gold) is correct


PIQA = T.parse_piqa({"goal": "Clean a pan", "sol1": "use soap", "sol2": "use sand."}, 1)["prompt"]
ARC = T.parse_ai2_mc("arc-easy", {"question": {"stem": "What is hot?", "choices": [
    {"text": "the sun", "label": "A"}, {"text": "Ice", "label": "B"}, {"text": "A", "label": "C"}]},
    "answerKey": "A"})["prompt"]


@pytest.mark.parametrize("generated, gold, prompt, correct", [
    (" 2", "solution2", None, True),  # a numbered option by its bare number, prompt or not
    (" (2)", "solution2", None, True),
    (" 2.\nmore", "solution2", None, True),
    (" 1", "solution2", None, False),
    (" 2 apples", "solution2", None, False),  # not the bare number
    (" Use sand", "solution2", PIQA, True),  # by its text (case and periods ignored)
    (" use soap", "solution2", PIQA, False),  # the other option's text
    (" use sand", "solution2", None, False),  # no prompt: no texts to compare with
    (" use sand", "solution1", PIQA, False),
    (" solution1: use sand", "solution2", PIQA, False),  # the label it names wins over text
    (" the sun", "A", ARC, True),
    (" ice", "B", ARC, True),
    (" the sun", "B", ARC, False),
    (" A", "C", ARC, False),  # "A" is a label (option A), though it is also option C's text
    (" A", "A", ARC, True),
    (" sun", "A", ARC, False),  # part of a text is not the text
])
def test_extract_answer_takes_an_option_by_number_or_text(generated, gold, prompt, correct):
    """Generate-mode answers naming a numbered option by its bare number, or an option by the text the prompt lists
    for it (`listed_options`), are scored as that option: correct for the gold one, wrong for another; a label in
    the answer is read as a label."""
    assert extract_answer(generated, gold, prompt) is correct


def test_listed_options_reads_the_option_lines_of_the_label_format():
    """The option lines right before "Answer format:" in the label-format prompts of nanoalign/plumbing/tasks.py; none for a
    prompt without them (builtin tasks list their options inline)."""
    assert listed_options(PIQA) == {"solution1": "use soap", "solution2": "use sand."}
    assert listed_options(ARC) == {"a": "the sun", "b": "Ice", "c": "A"}
    assert listed_options(T.builtin_examples("larger-number", "test", n=1)[0]["prompt"]) == {}
    assert listed_options("Question: x\nAnswer:") == {}


# ----------------------------------------------------------------------------------------------------------------
# cloze format (lm-evaluation-harness's doc_to_text / doc_to_choice, written out by hand from its task yamls)

def test_glue_cloze_prompts_are_the_harness_templates(tmp_path):
    """GLUE cloze: the harness's doc_to_text for sst2/cola/mrpc/qnli/rte, its choice words in its order, gold index
    from the label (qnli/rte: entailment is choice 0)."""
    g = tmp_path / "glue"
    write(g / "sst2/dev.tsv", "sentence\tlabel\ngood fun \t1\n")
    write(g / "cola/dev.tsv", "cl03\t0\t*\tBill left the.\n")
    write(g / "mrpc/dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t5\t6\tRain .\tIt rains .\n")
    write(g / "qnli/dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWho won?\tBob won.\tentailment\n")
    write(g / "rte/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tDana died.\tDana is alive.\tnot_entailment\n")
    expect = {
        "sst2": ("good fun\nQuestion: Is this sentence positive or negative?\nAnswer:", [" negative", " positive"], 1),
        "cola": ("Bill left the.\nQuestion: Does this sentence make sense?\nAnswer:", [" no", " yes"], 0),
        "mrpc": ("Sentence 1: Rain .\nSentence 2: It rains .\nQuestion: Do both sentences mean the same thing?\n"
                 "Answer:", [" no", " yes"], 1),
        "qnli": ("Who won?\nBob won.\nQuestion: Does this response answer the question?\nAnswer:", [" yes", " no"], 0),
        "rte": ("Dana died.\nQuestion: Dana is alive. True or False?\nAnswer:", [" True", " False"], 1),
    }
    for task, (prompt, options, gold) in expect.items():
        (ex,) = T.read_task(task, tmp_path, fmt="cloze")["test"]
        assert (ex["prompt"], ex["options"], ex["gold"], ex["answer"]) == (prompt, options, gold, options[gold]), task
        assert check_example(ex) is None


def test_commonsense_cloze_prompts_are_the_harness_templates(tmp_path):
    """Commonsense cloze: PIQA "Question: goal\\nAnswer:" + solutions; SIQA "Q: context question\\nA:" + answers;
    BoolQ passage/question + no/yes; ARC "Question: ...\\nAnswer:" + choice texts; OpenBookQA the bare stem;
    WinoGrande partial scoring (two contexts, one continuation)."""
    d = tmp_path / "commonsense"
    write(d / "piqa/valid.jsonl", jsonl([{"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid"}]))
    write(d / "piqa/valid-labels.lst", "0\n")
    write(d / "siqa/dev.jsonl", jsonl([{"context": "Tracy stayed.", "question": "Why?", "answerA": "x",
                                        "answerB": "y", "answerC": "z"}]))
    write(d / "siqa/dev-labels.lst", "3\n")
    write(d / "boolq/dev.jsonl", jsonl([{"question": "is the sky blue", "passage": "The sky is blue.",
                                         "answer": True}] * 10))
    write(d / "arc_easy/ai2_arc-test.jsonl", jsonl([{"question": "Which is a metal?", "choices": {
        "text": ["wood", "iron"], "label": ["A", "B"]}, "answerKey": "B"}]))
    write(d / "openbookqa/openbookqa-test.jsonl", jsonl([{"question_stem": "The sun is", "choices": {
        "text": ["cold", "hot"], "label": ["A", "B"]}, "answerKey": "B"}]))
    write(d / "winogrande/dev.jsonl", jsonl([{"sentence": "The trophy didn't fit because _ was big.",
                                              "option1": "the trophy", "option2": "the case", "answer": "1"}]))
    ex = T.read_task("piqa", tmp_path, fmt="cloze")["test"][0]
    assert ex == {"task": "piqa", "prompt": "Question: Open a jar\nAnswer:", "answer": " Twist the lid",
                  "options": [" Twist the lid", " Eat the lid"], "gold": 0}
    ex = T.read_task("siqa", tmp_path, fmt="cloze")["test"][0]
    assert ex["prompt"] == "Q: Tracy stayed. Why?\nA:" and ex["options"] == [" x", " y", " z"] and ex["gold"] == 2
    ex = T.read_task("boolq", tmp_path, fmt="cloze")["train"][0]
    assert ex["prompt"] == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:" and ex["answer"] == " yes"
    assert ex["options"] == [" no", " yes"]
    ex = T.read_task("arc-easy", tmp_path, fmt="cloze")["test"][0]
    assert ex["prompt"] == "Question: Which is a metal?\nAnswer:" and ex["options"] == [" wood", " iron"]
    assert ex["gold"] == 1
    ex = T.read_task("openbookqa", tmp_path, fmt="cloze")["test"][0]
    assert ex["prompt"] == "The sun is" and ex["answer"] == " hot"
    ex = T.read_task("winogrande", tmp_path, fmt="cloze")["test"][0]
    assert ex["contexts"] == ["The trophy didn't fit because the trophy", "The trophy didn't fit because the case"]
    assert ex["answer"] == " was big." and ex["gold"] == 0 and ex["prompt"] == ex["contexts"][0]
    assert check_example(ex) is None and "options" not in ex
    with pytest.raises(ValueError, match="label format only"):
        T.read_task("web_of_lies", tmp_path, fmt="cloze")


def test_check_example_gold_and_contexts():
    """`gold` must index the answer among the options (or the prompt among the contexts); contexts need gold."""
    base = {"task": "t", "prompt": "p", "answer": " b", "options": [" a", " b"]}
    assert check_example({**base, "gold": 1}) is None
    assert "does not point" in check_example({**base, "gold": 0})
    assert "index" in check_example({**base, "gold": 2})
    part = {"task": "t", "prompt": "c2", "answer": " rest", "contexts": ["c1", "c2"]}
    assert "needs 'gold'" in check_example(part)
    assert check_example({**part, "gold": 1}) is None and "does not point" in check_example({**part, "gold": 0})
    assert "not both" in check_example({**part, "gold": 1, "options": [" a", " b"]})


def test_gsm8k_parse_and_final_number():
    """GSM8K: calculator annotations removed, the '#### N' line kept; extraction compares final numbers (after the
    last '####', else the last number of the text)."""
    from nanoalign.data import final_number
    ex = T.parse_gsm8k({"question": "How many? ", "answer": "2 + 3 = <<2+3=5>>5 apples.\n#### 5"})
    assert ex["answer"] == " 2 + 3 = 5 apples.\n#### 5" and ex["prompt"].endswith("Question: How many?\nAnswer:")
    assert T.parse_gsm8k({"question": "q", "answer": "#### 1"}, fmt="cloze")["prompt"] == "Question: q\nAnswer:"
    with pytest.raises(ValueError, match="####"):
        T.parse_gsm8k({"question": "q", "answer": "five"})
    assert final_number("so 4 + 1 = 5\n#### 5") == 5 and final_number("so 4 + 1 = 1,005 in total.") == 1005
    assert final_number("no number") is None
    gold = ex["answer"]
    assert extract_answer(" 2 + 3 = 5.\n#### 5", gold) and extract_answer(" first 2, then 5 apples", gold)
    assert not extract_answer(" 5 apples, not 6", gold) and not extract_answer(" #### 6", gold)


def test_load_tasks_cloze_format_and_index(tmp_path):
    """load_tasks(fmt="cloze") reads <suite>/cloze/<task>-<split>.jsonl; every example carries its position in the
    split; max_per_task 0 keeps the whole split in file order; label-only suites refuse the cloze format."""
    rows = [{"task": "piqa", "prompt": f"Question: g{i}\nAnswer:", "answer": " a", "options": [" a", " b"],
             "gold": 0} for i in range(5)]
    write(tmp_path / "commonsense/cloze/piqa-test.jsonl", jsonl(rows))
    got = load_tasks("piqa", "test", data_dir=tmp_path, fmt="cloze", max_per_task=0)["piqa"]
    assert [ex["index"] for ex in got] == list(range(5)) and got[3]["prompt"] == "Question: g3\nAnswer:"
    sub = load_tasks("piqa", "test", data_dir=tmp_path, fmt="cloze", max_per_task=3, seed=1)["piqa"]
    assert len(sub) == 3 and all(got[ex["index"]]["prompt"] == ex["prompt"] for ex in sub)
    assert [ex["index"] for ex in sub] == sorted(ex["index"] for ex in sub)
    with pytest.raises(FileNotFoundError, match="piqa-test.jsonl not found"):
        load_tasks("piqa", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="label format only"):
        load_tasks("builtin", "test", fmt="cloze")


def test_prepare_writes_both_formats_with_the_same_rows(tmp_path):
    """prepare.py writes the label and the cloze file of a task, row for row the same examples."""
    src = tmp_path / "src"
    piqa = [{"goal": f"g{i}", "sol1": f"a{i}", "sol2": f"b{i}"} for i in range(4)]
    write(src / "commonsense/piqa/train.jsonl", jsonl(piqa))
    write(src / "commonsense/piqa/train-labels.lst", "0\n1\n1\n0\n")
    write(src / "commonsense/piqa/valid.jsonl", jsonl(piqa[:2]))
    write(src / "commonsense/piqa/valid-labels.lst", "1\n0\n")
    subprocess.run([sys.executable, str(REPO / "data/prepare.py"), "commonsense", "--source", str(src), "--tasks",
                    "piqa", "--out", str(tmp_path / "out")], check=True, capture_output=True)
    label = read_jsonl(tmp_path / "out/commonsense/piqa-train.jsonl")
    cloze = read_jsonl(tmp_path / "out/commonsense/cloze/piqa-train.jsonl")
    assert [ex["answer"] for ex in label] == [" solution1", " solution2", " solution2", " solution1"]
    assert [ex["answer"] for ex in cloze] == [" a0", " b1", " b2", " a3"]
    assert [ex["gold"] for ex in read_jsonl(tmp_path / "out/commonsense/cloze/piqa-test.jsonl")] == [1, 0]
