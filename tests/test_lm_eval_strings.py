"""The lm-eval format (nanoalign/plumbing/tasks.py, fmt="lm-eval") against strings made by lm-evaluation-harness's own task code.

tests/fixtures/lm_eval_strings.json was written once by `benchmarks/lm_eval_compare.py strings` in a venv with lm-eval
(version and command inside the file): lm-eval's task yamls, included unchanged and pointed at the original files of
shared/data converted to the schema of the dataset each yaml names, built their requests; the fixture keeps, per task,
the sha256 of every (context, continuation) pair and gold index of the whole evaluation split, and the docs and pairs
of the first 20 docs and of up to 20 whose fields carry outer whitespace.
"""

import json
from functools import partial
from pathlib import Path

import pytest

from nanoalign.plumbing import tasks as T
from nanoalign.data import choices_of

from test_data import SHARED

HERE = Path(__file__).resolve().parent
FIXTURE = json.loads((HERE / "fixtures" / "lm_eval_strings.json").read_text(encoding="utf-8"))
ROOT = HERE.parent


def compare():
    import importlib.util
    spec = importlib.util.spec_from_file_location("lm_eval_compare", ROOT / "benchmarks" / "lm_eval_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def our_pairs(ex):
    return [list(p) for p in choices_of(ex)[0]], choices_of(ex)[1]


def parse_doc(task, doc):
    """One lm-eval doc (its dataset's schema) through nanoalign's parser of the original row it came from."""
    if task == "piqa":
        return T.parse_piqa({k: doc[k] for k in ("goal", "sol1", "sol2")}, str(doc["label"]), fmt="lm-eval")
    if task == "social_iqa":
        return T.parse_siqa(doc, doc["label"], fmt="lm-eval")
    if task == "winogrande":
        return T.parse_winogrande(doc, fmt="lm-eval")
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        name = {"arc_easy": "arc-easy", "arc_challenge": "arc-challenge", "openbookqa": "openbookqa"}[task]
        return T.parse_ai2_mc(name, doc, fmt="lm-eval")
    if task == "boolq":  # the original row: SuperGLUE's passage is "<title> -- <passage>"
        title, passage = doc["passage"].split(" -- ", 1)
        return T.parse_boolq({"question": doc["question"], "title": title, "passage": passage,
                              "answer": bool(doc["label"])}, fmt="lm-eval")
    raise ValueError(task)


@pytest.mark.parametrize("task", sorted(FIXTURE["tasks"]))
def test_kept_docs_give_lm_evals_strings(task, tmp_path):
    """The fixture's docs (as original rows) through our parsers: lm-eval's contexts, continuations and gold."""
    for item in FIXTURE["tasks"][task]["examples"]:
        doc = item["doc"]
        if task == "sst2":  # a one-row GLUE tsv, the sentence column as lm-eval's dataset holds it
            path = tmp_path / "dev.tsv"
            path.write_text(f"sentence\tlabel\n{doc['sentence']}\t{doc['label']}\n", encoding="utf-8")
            (ex,) = T.parse_glue("sst2", path, fmt="lm-eval")
        else:
            ex = parse_doc(task, doc)
        assert our_pairs(ex) == (item["pairs"], item["gold"]), (task, item["doc_id"])


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
@pytest.mark.parametrize("task", sorted(FIXTURE["tasks"]))
def test_whole_splits_give_lm_evals_strings(task):
    """Every example of the evaluation split lm-eval scores, read from shared/data by nanoalign in the lm-eval
    format: the same pairs and gold indices as lm-eval's (sha256 of all of them), the same count."""
    lm = compare()
    want = FIXTURE["tasks"][task]
    examples = lm.ours_examples(task)
    assert len(examples) == want["n"]
    got = [our_pairs(ex) for ex in examples]
    assert lm.digest({"pairs": [p for p, _ in got], "gold": [g for _, g in got]}) == want["sha256"], task


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
def test_cloze_format_is_unchanged_where_lm_eval_differs():
    """The `cloze` format keeps its stripped strings (the cached claim grids read it): SST-2 without the trailing
    space, BoolQ without the title; lm-eval's differ exactly there."""
    lm_rows = T.read_task("sst2", SHARED, fmt="lm-eval")["test"]
    cloze_rows = T.read_task("sst2", SHARED, fmt="cloze")["test"]
    assert lm_rows[0]["prompt"] == "it 's a charming and often affecting journey . \nQuestion: Is this sentence " \
                                   "positive or negative?\nAnswer:"
    assert cloze_rows[0]["prompt"] == lm_rows[0]["prompt"].replace(". \n", ".\n", 1)
    boolq = T.parse_jsonl(T.task_dir(SHARED, "boolq") / "dev.jsonl", partial(T.parse_boolq, fmt="cloze"))
    assert boolq[0]["prompt"].startswith("All biomass goes through")
