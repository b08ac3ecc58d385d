"""The dev split written by data/prepare.py: up to DEV_SIZE examples per task that are neither trained on nor tested,
carved from the training rows the cap leaves out (else an official held-out split), the same rows in both formats,
without changing a byte of the train and test files."""

import hashlib
import importlib.util
import json
import subprocess
import sys

import pytest

from nanoalign.plumbing import tasks as T
from nanoalign.plumbing.datasets import load_tasks, read_jsonl

from test_data import REPO, SHARED, write

# sha256 of the train/test files that data/prepare.py wrote from shared/data before it wrote dev files (commit
# 05bae7c); experiment runs are keyed on these contents, so the dev split must leave them as they are
TRAIN_TEST_SHA256 = {
    "glue/sst2-train.jsonl": "0fe1701d0fc3405758404dea1432fac47f0eea295ac794abfd7e222720158942",
    "glue/sst2-test.jsonl": "e7b28043e46734c26c607fde276a6bab198d08d81af01b21bb6da199ec69c22e",
    "glue/cloze/sst2-train.jsonl": "13a7da1de6805ba13d7f3fbe391153389850798e46d83dadc5ca93b5d8dbd2a7",
    "glue/cloze/sst2-test.jsonl": "a0ade3ebd2cb3ea88b2e1e4d161c850971170a9f41d6c84312e8ae1b0770b829",
    "commonsense/arc-easy-train.jsonl": "321f396475c60b7d3cb809069a3bc9c111e2c602961ded62f4dd17d9a641f368",
    "commonsense/arc-easy-test.jsonl": "ff8327c2f7319d60e5fa1dcf60c28caa761677bb0834f36435383c4f2e5e2e96",
    "commonsense/cloze/arc-easy-train.jsonl": "9fc35a0512739a50f15803dfa797e27835c7b3f3ed989aa02a05b9f3a86e5f1b",
    "commonsense/cloze/arc-easy-test.jsonl": "a6bfd646d24c0d96ba3720fef3615dfab6da7ef0e0574413ec9b8fe8453d3a01",
    "commonsense/siqa-train.jsonl": "d9ec0ba488f1760937010358568214328ed1302b5d5d74d02d58d6481218d384",
    "commonsense/siqa-test.jsonl": "e61ca77f44a27529a3f4bef535e2b25c0a9b7f0fa2d1cde336fbd18f8b92c85a",
    "commonsense/cloze/siqa-train.jsonl": "e1b72bca3e7360b24cc7b8962def0a72d653c36fbddac004b111b71e554af663",
    "commonsense/cloze/siqa-test.jsonl": "9f4ed80cc93210c97d8f88377449f3b0f9ee547aa55cab7a0dbffcb422558a9e",
}


def key(ex, fmt):
    """What must differ between dev and train/test: the prompt (label format: it lists the options too), and for
    cloze the prompt with its options."""
    return ex["prompt"] if fmt == "label" else (ex["prompt"], tuple(ex["options"]))


def check_disjoint_and_aligned(task, out, source):
    """dev shares no input with train or test in either format, and the label and cloze dev files hold the same rows:
    the same positions of the task's original training rows + held-out split, which read_task yields row-aligned."""
    where = []
    for fmt in T.FORMATS:
        split = {s: load_tasks(task, s, data_dir=out, fmt=fmt)[task] for s in ("train", "dev", "test")}
        dev = {key(ex, fmt) for ex in split["dev"]}
        assert not dev & {key(ex, fmt) for ex in split["train"]}, (task, fmt, "dev overlaps train")
        assert not dev & {key(ex, fmt) for ex in split["test"]}, (task, fmt, "dev overlaps test")
        original = T.read_task(task, source, fmt=fmt)
        pool = original["train"] + original.get("dev", [])
        at = {}  # row -> its positions in the pool (a row can occur twice)
        for i, ex in enumerate(pool):
            at.setdefault(json.dumps(ex, sort_keys=True), []).append(i)
        rows = [json.dumps({k: v for k, v in ex.items() if k != "index"}, sort_keys=True) for ex in split["dev"]]
        assert all(at.get(r) for r in rows), (task, fmt, "a dev row that is not an original train/held-out row")
        where.append([at[r].pop(0) for r in rows])
    assert where[0] == where[1], (task, "label and cloze dev rows differ")
    return where[0], len(original["train"])


def test_dev_positions_pass_over_seen_inputs():
    """dev_positions keeps up to n positions, seeded and ascending, never one whose input is in `seen`."""
    pool = [{"task": "t", "prompt": f"p{i % 40}", "answer": " a"} for i in range(50)]  # p0..p9 twice
    seen = [{"task": "t", "prompt": f"p{i}", "answer": " b"} for i in range(0, 40, 2)]
    at = T.dev_positions(pool, seen, n=10, seed=1, salt="t")
    assert len(at) == 10 and at == sorted(at) and at == T.dev_positions(pool, seen, n=10, seed=1, salt="t")
    assert at != T.dev_positions(pool, seen, n=10, seed=2, salt="t")
    everything = T.dev_positions(pool, seen, n=100)
    assert everything == [i for i in range(50) if i % 40 % 2]


def test_prepare_carves_dev_from_rows_the_cap_leaves_out(tmp_path, monkeypatch, capsys):
    """On a fixture source with a small cap: sst2's dev is exactly its left-out training rows minus those whose
    sentence is also in train or test (a duplicate, a test sentence), the same rows in both formats; ARC (uncapped)
    takes dev from its validation file; RTE has none, and says so."""
    src, out = tmp_path / "src", tmp_path / "out"
    sentences = [f"s{i} ." for i in range(37)] + ["s0 .", "s1 .", "t0 ."]  # 2 duplicates, 1 test sentence
    rows = "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(sentences))
    write(src / "glue/sst2/train.tsv", "sentence\tlabel\n" + rows)
    write(src / "glue/sst2/dev.tsv", "sentence\tlabel\nt0 .\t1\nt1 .\t0\n")
    write(src / "glue/rte/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n")
    write(src / "glue/rte/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tC.\tD.\tentailment\n")
    arc = '{"question": "%s?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"}\n'
    for name, qs in (("train", "abc"), ("test", "de"), ("validation", "fgd")):  # validation's "d" is a test question
        write(src / f"commonsense/arc_easy/ai2_arc-{name}.jsonl", "".join(arc % q for q in qs))
    spec = importlib.util.spec_from_file_location("prepare", REPO / "data/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    monkeypatch.setitem(prepare.TRAIN_CAPS, "sst2", 20)
    for argv in (["glue", "--tasks", "sst2,rte"], ["commonsense", "--tasks", "arc-easy"]):
        monkeypatch.setattr(sys, "argv", ["prepare.py", *argv, "--source", str(src), "--out", str(out)])
        prepare.main()
    assert "no dev split for rte" in capsys.readouterr().out and not (out / "glue/rte-dev.jsonl").exists()

    train = [json.loads(line)["prompt"] for line in (out / "glue/sst2-train.jsonl").read_text().splitlines()]
    kept = set(T.subsample(range(len(sentences)), 20, seed=42, salt="sst2"))
    assert train == [T.read_task("sst2", src)["train"][i]["prompt"] for i in sorted(kept)]
    held = {f"s{i} ." for i in range(37) if i in kept} | {"t0 .", "t1 ."}
    expect = [i for i, s in enumerate(sentences) if i not in kept and s not in held]
    assert len(expect) < len(sentences) - 20  # the fixture does hold left-out rows that dev must pass over
    at, _ = check_disjoint_and_aligned("sst2", out, src)
    assert at == expect
    at, n_train = check_disjoint_and_aligned("arc-easy", out, src)
    assert [i - n_train for i in at] == [0, 1]  # validation's f and g; d is a test question


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
def test_dev_split_of_the_claims_suite(tmp_path):
    """SST-2, ARC-Easy, SIQA from shared/data: train and test files byte-identical to those written before the dev
    split existed; 300 dev rows per task in both formats, disjoint from train and test, the same rows in both; SST-2
    and SIQA dev from the training rows their caps leave out, ARC-Easy dev from ARC's validation split."""
    for suite, tasks in (("glue", "sst2"), ("commonsense", "arc-easy,siqa")):
        r = subprocess.run([sys.executable, str(REPO / "data/prepare.py"), suite, "--tasks", tasks, "--source",
                            str(SHARED), "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    got = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in TRAIN_TEST_SHA256}
    assert got == TRAIN_TEST_SHA256
    for task in ("sst2", "arc-easy", "siqa"):
        for fmt in T.FORMATS:
            assert len(read_jsonl(tmp_path / T.TASK_SUITE[task] / ("cloze" if fmt == "cloze" else "")
                                  / f"{task}-dev.jsonl")) == 300, (task, fmt)
        at, n_train = check_disjoint_and_aligned(task, tmp_path, SHARED)
        from_held_out = task == "arc-easy"
        assert all((i >= n_train) == from_held_out for i in at), task


def test_load_tasks_dev_split_missing_file_names_prepare(tmp_path):
    """split='dev' is accepted; a missing dev file is an error that says to run data/prepare.py."""
    with pytest.raises(FileNotFoundError, match="python data/prepare.py glue .*--tasks sst2"):
        load_tasks("sst2", "dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'train', 'dev' or 'test'"):
        load_tasks("sst2", "valid", data_dir=tmp_path)
