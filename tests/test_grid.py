"""The cached, resumable grid runner (experiments/grid.py) on the tiny random Llama: what is cached is never
trained again, a killed run resumes from its checkpoint, keys change exactly when the result would."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import grid as G  # noqa: E402

TASKS = ("alphabet-first", "colour-review")


@pytest.fixture()
def suite(tiny, tmp_path):
    return G.Suite(TASKS, model=str(tiny), steps=3, batch_per_task=1, lr=1e-2, warmup=1, seq_len=64, train_pool=16,
                   test_per_task=6, mode="loglik", data_dir=str(tmp_path / "data"), probe_examples=3)


def methods():
    return {"lora": G.Method({"adapter": "lora", "rank": 2, "targets": "q_proj,v_proj"}, analyses=("spectrum",)),
            "hydra": G.Method({"adapter": "hydra", "rank": 2, "heads": 2, "targets": "q_proj,v_proj"},
                              analyses=("heads", "probe"))}


def test_grid_runs_caches_and_rerenders(suite, tmp_path, one_thread, monkeypatch):
    """A 2-method x 2-seed grid writes one result per run (diagnostics, predictions, curve, analyses, machine) and
    the base model's; a second Grid object over the same cache finds nothing missing and trains nothing."""
    g = G.Grid("t", suite, methods(), [0, 1], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    res = g.run()
    assert len(res["lora"]) == len(res["hydra"]) == 2 and res["base"]["label"] == "base"
    r = res["hydra"][1]
    assert r["seed"] == 1 and set(r["tasks"]) == set(TASKS) and r["curve"]["steps"] == 3
    assert {"n", "se", "majority_rate", "predicted", "collapsed"} <= set(r["tasks"][TASKS[0]])
    assert len(r["predictions"][TASKS[0]]["correct"]) == 6 and len(r["predictions"][TASKS[0]]["scores"][0]) >= 2
    assert "head_cosine" in r["analysis"] and "probe" in r["analysis"] and not r["merged_for_eval"]
    assert "effective_rank_mean" in res["lora"][0]["analysis"] and res["lora"][0]["merged_for_eval"]
    assert r["machine"]["commit"] is not None and r["wall_s"] > 0
    assert not (tmp_path / "work" / r["key"] / "checkpoint").exists()  # optimizer state dropped, adapter kept
    assert (tmp_path / "work" / r["key"] / "adapter" / "adapter_config.json").exists()
    again = G.Grid("t", suite, methods(), [0, 1], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    assert again.missing() == []
    monkeypatch.setattr(G.train, "train", lambda cfg: pytest.fail("a cached run was trained again"))
    assert again.run()["hydra"][1]["average"] == r["average"]


def test_seeds_share_the_data_and_keys_track_what_matters(suite, tmp_path):
    """Seeds change only init/dropout/order: the same training pool and test set for every seed (pool_seed fixed);
    the key changes with the seed, the method or the budget, and not with where the run writes or how it logs."""
    g = G.Grid("t", suite, methods(), [0, 1], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    c0, c1 = (G.train_config(suite, methods()["lora"].options, s, tmp_path) for s in (0, 1))
    assert c0.pool_seed == c1.pool_seed and c0.seed != c1.seed
    assert len({g.key("lora", 0), g.key("lora", 1), g.key("hydra", 0)}) == 3
    moved = G.Grid("t2", suite, methods(), [0], results_dir=tmp_path / "elsewhere", work_dir=tmp_path / "w2")
    assert moved.key("lora", 0) == g.key("lora", 0)
    longer = G.Grid("t", G.Suite(**{**suite.__dict__, "steps": 4}), methods(), [0])
    assert longer.key("lora", 0) != g.key("lora", 0)
    with pytest.raises(ValueError, match="unknown train.py option"):
        G.train_config(suite, {"rnak": 3}, 0, tmp_path)


def test_killed_run_resumes_from_its_checkpoint(suite, tmp_path, one_thread):
    """A run stopped after its first checkpoint (as if killed) is resumed, not restarted: the finished result equals
    an uninterrupted run's (same loss curve and accuracy)."""
    s = G.Suite(**{**suite.__dict__, "steps": 4})
    m = {"lora": G.Method({"adapter": "lora", "rank": 2, "targets": "q_proj,v_proj", "ckpt_every": 2})}
    ref = G.Grid("t", s, m, [0], results_dir=tmp_path / "a", work_dir=tmp_path / "wa").run()["lora"][0]
    g = G.Grid("t", s, m, [0], results_dir=tmp_path / "b", work_dir=tmp_path / "wb")
    cfg = G.train_config(s, {**m["lora"].options, "stop_at": 2}, 0, tmp_path / "wb")
    cfg.run_name = g.key("lora", 0)
    assert G.launch.train(cfg) is None  # stopped at step 2 with a checkpoint, like a kill after it
    out = g.run()["lora"][0]
    assert out["resumed"] and out["curve"]["ce_every"] == ref["curve"]["ce_every"]
    assert out["average"] == ref["average"]


def test_options_added_later_leave_the_keys_of_earlier_runs_alone():
    """Every train.py option listed as added after the first result format has, in the configuration a grid builds
    for a method that does not set it, the value the grid leaves out of the key (so older cached runs keep their
    keys; e.g. mmd_rows: train.py caps the MMD at 32 rows by default, grids keep every row, as the runs before the
    option did), and no other option is missing from the key."""
    defaults = {f.name: f.default for f in G.dataclasses.fields(G.train.TrainConfig)}
    built = G.dataclasses.asdict(G.train_config(G.Suite(("a",)), {}, 0, Path("unused")))
    assert all(built[k] == v for k, v in G.ADDED_LATER.items())
    assert not (set(G.ADDED_LATER) | G.NOT_IN_KEY) - set(defaults)


def test_recheck_retrains_a_cached_run_elsewhere_and_compares(suite, tmp_path, one_thread):
    """`Grid.recheck`: a cached run trained again from scratch into another directory is, on the same machine, the
    same run: every prediction agrees, scores and average are equal; the cache is untouched; a run not in the cache
    is an error, and so is comparing two different runs."""
    g = G.Grid("t", suite, methods(), [0], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    g.run()
    cached = g.path("hydra", 0).read_bytes()
    r = g.recheck("hydra", 0, tmp_path / "scratch")
    assert r["key"] == g.key("hydra", 0) and r["n"] == 2 * 6 and r["agree"] == r["n"]
    assert r["average_diff"] == 0.0 and all(t["max_abs_score_diff"] == 0.0 for t in r["tasks"].values())
    assert (tmp_path / "scratch" / "results" / "runs" / f"{r['key']}.json").exists()
    assert g.path("hydra", 0).read_bytes() == cached
    base = g.recheck("base", None, tmp_path / "scratch")
    assert base["label"] == "base" and base["agree"] == base["n"] == 12
    with pytest.raises(ValueError, match="not in the cache"):
        g.recheck("lora", 1, tmp_path / "scratch")
    other = json.loads(g.path("lora", 0).read_text())
    with pytest.raises(ValueError, match="different runs"):
        G.compare_runs(json.loads(cached), other)


def fake_glue(d: Path, tag=""):
    """Prepared SST-2 and CoLA files (label format, 24 train / 6 test rows each) of made-up sentences: a
    file-backed suite for the tiny model; `tag` changes the test sentences (other data, same suite)."""
    from nanoalign.plumbing.datasets import write_jsonl
    for t, words in (("sst2", (" negative", " positive")), ("cola", (" unacceptable", " acceptable"))):
        for split, n in (("train", 24), ("test", 6)):
            write_jsonl(d / "glue" / f"{t}-{split}.jsonl",
                        [{"task": t, "prompt": f"{t} {split}{tag} sentence {i}:", "answer": words[i % 2],
                          "options": list(words)} for i in range(n)])
    return d


def glue_grid(tiny, tmp_path, data_dir, seeds=(0, 1)):
    s = G.Suite(("sst2", "cola"), model=str(tiny), steps=2, batch_per_task=1, lr=1e-2, warmup=1, seq_len=64,
                test_per_task=6, mode="loglik", data_dir=str(data_dir), probe_examples=3)
    m = {"lora": G.Method({"adapter": "lora", "rank": 2, "targets": "q_proj,v_proj"})}
    return G.Grid("t", s, m, list(seeds), results_dir=tmp_path / "res", work_dir=tmp_path / "work")


def keys(res):
    return {k: [r["key"] for r in v] if isinstance(v, list) else v and v["key"] for k, v in res.items()}


def test_cache_is_read_without_the_data(tiny, tmp_path, one_thread, capsys):
    """A fresh clone has no prepared data: the cached runs are found by what they were (suite, train options, seed),
    the same ones as by key; training without the data, or from a data directory that is a file, missing or broken,
    is one `error:` line. Runs made on different data are never mixed: one run cached on two data versions is not
    read without the data, and a grid whose runs disagree on their data is an error."""
    ran = glue_grid(tiny, tmp_path, fake_glue(tmp_path / "data")).run()
    assert ran["lora"][0]["data"] == {"test": ran["base"]["data"]["test"], "train": ran["lora"][0]["data"]["train"]}
    (tmp_path / "empty").mkdir()
    g = glue_grid(tiny, tmp_path, tmp_path / "empty")
    assert not g.keyed() and keys(g.results()) == keys(ran) and g.missing() == []
    with pytest.raises(SystemExit, match=r"^error: .*sst2-test.jsonl not found.*training needs the prepared data"):
        g.run()
    (tmp_path / "a-file").write_text("x")
    for d in (tmp_path / "nothing", tmp_path / "a-file"):
        with pytest.raises(SystemExit, match=r"^error: the data directory .* is not a directory: point "):
            glue_grid(tiny, tmp_path, d).results()
    junk = fake_glue(tmp_path / "junk")
    (junk / "glue" / "cola-test.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"^error: .*cola-test.jsonl:1: not valid JSON.*prepare it again"):
        glue_grid(tiny, tmp_path, junk).results()
    # seed 1 again on other test data: by key each data version finds its own; without data seed 1 has two results
    glue_grid(tiny, tmp_path, fake_glue(tmp_path / "v2", tag="v2"), seeds=[1]).run()
    capsys.readouterr()
    g = glue_grid(tiny, tmp_path, tmp_path / "empty")
    assert keys(g.results()) == {"lora": [ran["lora"][0]["key"]], "base": None}
    assert "one run on different data" in capsys.readouterr().err
    for p in (tmp_path / "res" / "runs").glob("*.json"):  # keep seed 0 on the first data, seed 1 on v2, no base
        r = json.loads(p.read_text())
        if r["label"] == "base" or (r["seed"] == 1) != ("v2" in r["config"]["data_dir"]):
            p.unlink()
    with pytest.raises(SystemExit, match=r"^error: cached runs .* were made on different test data"):
        glue_grid(tiny, tmp_path, tmp_path / "empty").results()


DAMAGE = {"cut in half": lambda t: t[:len(t) // 2], "empty": lambda t: "", "{}": lambda t: "{}",
          "a string for a number": lambda t: t.replace('"average": ', '"average": "high", "was": ', 1)}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_run_file_is_moved_aside_and_retrained(suite, tmp_path, one_thread, capsys, damage):
    """A cached run file cut in half, empty, `{}` or with a string where a number belongs: reading moves it to
    runs/damaged/ with one line naming it and counts it as missing (the reports list it), `run` trains it again,
    and recheck says it is not in the cache (an `error:` line in claims.py)."""
    m = {"lora": methods()["lora"]}
    g = G.Grid("t", suite, m, [0], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    good = g.run()["lora"][0]
    path = g.path("lora", 0)
    path.write_text(DAMAGE[damage](path.read_text()))
    capsys.readouterr()
    with pytest.raises(ValueError, match="not in the cache"):
        g.recheck("lora", 0, tmp_path / "scratch")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"damaged cached run {path}: ") and "moved to" in err[0]
    assert not path.exists() and len(list((path.parent / "damaged").glob(f"{path.name}.*"))) == 1
    g = G.Grid("t", suite, m, [0], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    assert g.results()["lora"] == [] and g.missing() == [("lora", 0)]
    assert g.run()["lora"][0]["average"] == good["average"] and json.loads(path.read_text())["key"] == good["key"]


def test_a_run_is_trained_by_one_driver_at_a_time(suite, tmp_path, one_thread, capsys):
    """Two drivers on one grid: a run whose lock (work_dir/<key>.lock, "pid host") is held by a live process is
    skipped and listed at the end, its lock left alone; a lock left by a process of this host that is gone is taken
    over with a note and the run trained; the lock is released after the run."""
    import os
    import platform
    import subprocess
    g = G.Grid("t", suite, methods(), [0], results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    held, stale = g.work_dir / f"{g.key('hydra', 0)}.lock", g.work_dir / f"{g.key('lora', 0)}.lock"
    held.parent.mkdir(parents=True)
    held.write_text(f"{os.getppid()} {platform.node()}\n")  # the process that started pytest: alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale.write_text(f"{dead.pid} {platform.node()}\n")
    res = g.run()
    out = capsys.readouterr().out
    assert [r["seed"] for r in res["lora"]] == [0] and res["hydra"] == []
    assert g.busy == [("hydra", 0, f"{os.getppid()} {platform.node()}")] and held.exists() and not stale.exists()
    assert f"was held by process {dead.pid}" in out and "skipped 1 run(s) another driver is training: hydra seed 0" \
        in out
    assert G.claim(stale) is None and G.claim(stale) == f"{os.getpid()} {platform.node()}"  # O_EXCL: one holder
    held.write_text("123 another-host\n")  # another host's process cannot be checked from here: respected
    assert G.claim(held) == "123 another-host"


def test_dev_split_is_scored_and_keyed_only_where_the_suite_has_one(tiny, tmp_path, one_thread):
    """A suite with dev_per_task scores the base model and every run on that many dev examples per task too (the
    split choices are made on), and its keys differ from the same suite's without it; a suite without it keys and
    describes itself as before the field existed."""
    from nanoalign.plumbing.datasets import write_jsonl
    d = fake_glue(tmp_path / "data")
    for t in ("sst2", "cola"):
        write_jsonl(d / "glue" / f"{t}-dev.jsonl", [{"task": t, "prompt": f"{t} dev sentence {i}:", "answer": " yes",
                                                     "options": [" no", " yes"]} for i in range(5)])
    plain = glue_grid(tiny, tmp_path, d, seeds=(0,))
    with_dev = G.Grid("t", G.Suite(**{**plain.suite.__dict__, "dev_per_task": 4}), plain.methods, [0],
                      results_dir=tmp_path / "res", work_dir=tmp_path / "work")
    assert "dev_per_task" not in plain.suite.describe() and with_dev.suite.describe()["dev_per_task"] == 4
    assert plain.key("lora", 0) != with_dev.key("lora", 0) and plain.base_path() != with_dev.base_path()
    assert plain.data.dev is None and {t: len(v) for t, v in with_dev.data.dev.items()} == {"cola": 4, "sst2": 4}
    res = with_dev.run()
    run, base = res["lora"][0], res["base"]
    for r in (run, base):
        assert set(r["dev"]["tasks"]) == {"sst2", "cola"} and all(v["n"] == 4 for v in r["dev"]["tasks"].values())
        assert 0 <= r["dev"]["average"] <= 1 and len(r["dev"]["predictions"]["sst2"]["correct"]) == 4
        assert r["data"]["dev"] == with_dev.data.dev_fp
    assert "dev" not in plain.run()["lora"][0]
