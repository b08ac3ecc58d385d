"""Cached, resumable grids of training runs: methods × seeds on one `Suite` (model, tasks, budget, test set).

Seeds change only the adapter init, dropout and data order, so methods compare seed by seed and example by example
(experiments.stats). A run (`launch.train`, one evaluation, merged where mergeable, and the grid's analyses) is stored
as experiments/results/runs/<key>.json, the key a hash of all that determines it: a killed grid resumes, a shared run
trains once. Without the prepared data a run is found by what it was (`run_id`); damaged files move to runs/damaged/;
a lock file (`claim`) lets several drivers share a grid.
"""

import copy
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nanoalign.plumbing  # noqa: E402  (before torch: nanoalign sets OMP_WAIT_POLICY, nanoalign/__init__.py)
import torch  # noqa: E402

import train  # noqa: E402
from experiments.analysis import delta_weight_spectrum, effective_rank, head_cosine_similarity, separation_probe  # noqa
from nanoalign.adapters import count_trainable, merge_adapters  # noqa: E402
from nanoalign.evaluate import evaluate, without_records  # noqa: E402
from nanoalign.plumbing import fast, launch, system  # noqa: E402
from nanoalign.plumbing.adapter_io import load_adapter  # noqa: E402
from nanoalign.plumbing.checkpoint import read_log  # noqa: E402
from nanoalign.plumbing.datasets import load_tasks  # noqa: E402
from nanoalign.plumbing.scoring import progress_bar  # noqa: E402
from nanoalign.plumbing.tasks import TASK_SUITE  # noqa: E402

# overridable so that a grid run from a pinned worktree (edits here cannot change it) writes into this checkout
RESULTS = Path(os.environ.get("NANOALIGN_RESULTS", ROOT / "experiments" / "results"))
WORK = Path(os.environ.get("NANOALIGN_WORK", ROOT / "experiments" / "work"))  # git-ignored
DATA_DIR = os.environ.get("NANOALIGN_DATA_DIR", str(ROOT / "data"))  # prepared JSONL (data/prepare.py)
FORMAT_VERSION = 1  # bump when a result's meaning changes (it is part of every key)


@dataclass(frozen=True)
class Suite:
    """What every run of a grid shares: model, tasks, prompt format, training budget, test set and scoring."""
    tasks: tuple
    model: str = "smollm2-135m"
    fmt: str = "label"               # prompt format (nanoalign.plumbing.tasks.FORMATS)
    steps: int = 200
    batch_per_task: int = 2          # examples of every task per step
    lr: float = 1e-3
    warmup: int = 20
    seq_len: int = 256
    train_pool: int = 0              # training examples per task (0: the whole prepared split)
    test_per_task: int = 500         # 0: the whole test split
    mode: str = "loglik"             # scoring (nanoalign.evaluate.MODES); cloze format -> "cloze"
    data_dir: str = DATA_DIR
    probe_examples: int = 16         # held-out examples per task for the separation probe
    dev_per_task: int = 0            # also score every run on this many dev examples per task (0: no dev split)

    def describe(self):
        d = dataclasses.asdict(self)
        d.pop("data_dir")
        if not d["dev_per_task"]:  # added later: suites without a dev split describe themselves as before
            d.pop("dev_per_task")
        return d


@dataclass
class Method:
    """One row of a grid: train.py options and the analyses of the trained adapter ("heads", "spectrum", "probe")."""
    options: dict
    analyses: tuple = ()


def train_config(suite: Suite, options: dict, seed: int, out: Path) -> "train.TrainConfig":
    """train.py's TrainConfig of one run: the suite's budget, the method's options, the seed."""
    cfg = train.TrainConfig(model=suite.model, data=",".join(suite.tasks), format=suite.fmt,
                            data_dir=suite.data_dir, max_per_task=suite.train_pool, max_steps=suite.steps,
                            batch_per_task=suite.batch_per_task, lr=suite.lr, warmup=suite.warmup,
                            seq_len=suite.seq_len, seed=seed, eval_max=0, out=str(out), log_every=25,
                            ckpt_every=25, mmd_rows=0)  # MMD over every row: exact, and cheap at these lengths
    for k, v in options.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown train.py option {k!r} in a grid method")
        setattr(cfg, k, v)
    return cfg


# train.py options that do not change what a run computes (where it writes, how often it logs or saves)
NOT_IN_KEY = {"out", "run_name", "resume", "log_every", "ckpt_every", "stop_at", "eval_every", "eval_max", "eval_mode",
              "eval_tokens", "eval_data", "data_dir", "device", "compile"}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Data:
    """The suite's training pool and test set, with content fingerprints for the run keys."""

    def __init__(self, suite: Suite):
        def load(split, n):
            return load_tasks(",".join(suite.tasks), split, data_dir=suite.data_dir, max_per_task=n, seed=0,
                              fmt=suite.fmt)
        self.test, train_pool = load("test", suite.test_per_task or None), load("train", suite.train_pool or None)
        self.test_fp, self.train_fp = fingerprint(self.test), fingerprint(train_pool)
        self.train_sizes = {t: len(v) for t, v in train_pool.items()}
        # the split every choice is made on (data/README.md): never trained on, never test
        self.dev = load("dev", suite.dev_per_task) if suite.dev_per_task else None
        self.dev_fp = None if self.dev is None else fingerprint(self.dev)


def load_data(suite: Suite, need=True):
    """The suite's Data; where its files are missing, None if not `need` (reading the cache), else an `error:` exit."""
    d = Path(suite.data_dir)
    if any(TASK_SUITE.get(t) != "builtin" for t in suite.tasks) and not d.is_dir():
        raise SystemExit(f"error: the data directory {d} is not a directory: point NANOALIGN_DATA_DIR at the folder "
                         f"data/prepare.py writes (holding glue/ and commonsense/), or unset it")
    try:
        return Data(suite)
    except FileNotFoundError as e:
        if not need:
            return None
        raise SystemExit(f"error: {e} (training needs the prepared data; reading the cache does not)")
    except ValueError as e:
        raise SystemExit(f"error: {e}: prepare it again with data/prepare.py, or point NANOALIGN_DATA_DIR at a "
                         f"prepared folder")


# train.py options added after FORMAT_VERSION 1: at this value (what older runs computed) a field stays out of the key
ADDED_LATER = {"trainer": "standard", "shots": 0, "meta_tasks": 4, "meta_support": 4, "meta_query": 4,
               "meta_inner_steps": 1, "meta_inner_lr": 3e-2, "meta_agg": "mean", "meta_order": 1, "mmd_rows": 0}


def key_fields(config: dict) -> dict:
    """The train.py fields that determine a run: all but NOT_IN_KEY, and ADDED_LATER ones only off their default."""
    return {k: v for k, v in config.items() if k not in NOT_IN_KEY and not (k in ADDED_LATER and v == ADDED_LATER[k])}


def run_key(cfg, suite: Suite, data: Data) -> str:
    dev = {"dev": data.dev_fp} if data.dev_fp else {}  # only where there is one: earlier keys stay as they were
    return fingerprint({"v": FORMAT_VERSION, "train": key_fields(dataclasses.asdict(cfg)), "test": data.test_fp,
                        "train_data": data.train_fp, "mode": suite.mode, "probe": suite.probe_examples, **dev})[:16]


def base_key(suite: Suite, data: Data) -> str:
    dev = {"dev": data.dev_fp} if data.dev_fp else {}
    return fingerprint({"v": FORMAT_VERSION, "base": suite.model, "test": data.test_fp, "mode": suite.mode, **dev})[:16]


# the suite's fields that pick the base model's evaluation
BASE_FIELDS = ("model", "tasks", "fmt", "test_per_task", "mode", "dev_per_task")


def run_id(suite_desc: dict, config: dict) -> str:
    """What a run was, without its data: the suite's description and its key's train.py fields."""
    return fingerprint({"v": FORMAT_VERSION, "train": key_fields(config), "suite": suite_desc})


def base_id(suite_desc: dict) -> str:
    return fingerprint({"v": FORMAT_VERSION, "base": {k: suite_desc[k] for k in BASE_FIELDS if k in suite_desc}})


def result_id(r: dict) -> str:
    return base_id(r["suite"]) if r["label"] == "base" else run_id(r["suite"], r["config"])


NUM = (int, float)


def problem(r, key):
    """Why a cached result cannot be used (wrong key, a field missing or mistyped), or None."""
    if not isinstance(r, dict):
        return "not a JSON object"
    if r.get("key") != key:
        return f"its key is {r.get('key')!r}, not {key!r} as its file name says"
    need = {"label": str, "suite": dict, "average": NUM, "wall_s": NUM, "tasks": dict, "predictions": dict,
            "machine": dict}
    if r.get("label") != "base":
        need.update(seed=int, config=dict, trainable=int, curve=dict, analysis=dict)
    for k, t in need.items():
        if not isinstance(r.get(k), t) or isinstance(r.get(k), bool):
            return f"{k!r} is {str(r.get(k))[:40]!r}, not {'a number' if t is NUM else 'an ' + t.__name__}"
    if not r["tasks"]:
        return "no tasks"
    for t, v in r["tasks"].items():
        if not (isinstance(v, dict) and isinstance(v.get("accuracy"), NUM) and isinstance(v.get("collapsed"), bool)):
            return f"task {t!r} has no numeric accuracy or no collapse flag"
        p = r["predictions"].get(t)
        if not isinstance(p, dict) or not isinstance(p.get("correct"), list) or \
                not all(x in (0, 1) for x in p["correct"]):
            return f"task {t!r} has no 0/1 list of per-example predictions"
    return None


def claim(lock: Path):
    """Create `lock` atomically holding "pid host": None when we hold it, else who does (a dead local holder's is
    taken over)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    host = platform.node()
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text().strip()
            except FileNotFoundError:
                continue  # released just now: try again
            pid, _, where = holder.partition(" ")
            if where != host or not pid.isdigit() or system.pid_alive(int(pid)):
                return holder or "another driver (empty lock file)"
            print(f"note: {lock} was held by process {pid} on {host}, which is gone: taking it over", flush=True)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        return None
    return "another driver"


# {runs dir: (its files' names, mtimes and sizes, {result_id: path})}: built once per state of the dir
_INDEX = {}


def machine() -> dict:
    """Where and when a number was measured (the tutorials record it too)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit, "dirty": dirty,
            "host": platform.node(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels' ISA (AVX2, AVX512, ...)
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


write_json = functools.partial(system.write_json, indent=1)  # one space of indent: the cached runs are large


def compact_predictions(results):
    """Per task, the per-example records as columns (index, gold, pred, correct, scores rounded to 4 decimals)."""
    out = {}
    for t, r in results.items():
        recs = r["records"]
        out[t] = {"index": [x["index"] for x in recs], "gold": [x["gold"] for x in recs],
                  "pred": [x["pred"] for x in recs], "correct": [int(x["correct"]) for x in recs]}
        if recs and "scores" in recs[0]:
            out[t]["scores"] = [[round(v, 4) for v in x["scores"]] for x in recs]
        if recs and "correct_norm" in recs[0]:
            out[t]["correct_norm"] = [int(x["correct_norm"]) for x in recs]
    return out


def curve_summary(log_path: Path, every=10):
    """The training curve in a few numbers: CE of the first/last 5 steps and per `every` steps, last align, step ms."""
    recs = [r for r in read_log(log_path) if "ce" in r]
    ce = [r["ce"] for r in recs]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    ms = sorted(r["ms"] for r in recs)
    return {"steps": len(recs), "ce_first5": mean(ce[:5]), "ce_last5": mean(ce[-5:]),
            "ce_every": [mean(ce[i:i + every]) for i in range(0, len(ce), every)],
            "align_last5": mean([r["align"] for r in recs[-5:]]), "step_ms_median": ms[len(ms) // 2] if ms else None}


def analyse(model, tok, names, data: Data, suite: Suite, analyses):
    """The grid's analyses of a trained (unmerged) adapter."""
    out = {}
    if "heads" in analyses:
        sims = head_cosine_similarity(model)
        by_type = {kind: [v for (_, k), v in sims.items() if k == kind] for _, kind in sims}
        out["head_cosine"] = {k: sum(v) / len(v) for k, v in by_type.items()}
        out["head_cosine_mean"] = sum(sims.values()) / len(sims) if sims else None
        out["head_cosine_per_layer"] = {f"{layer}.{kind}": v for (layer, kind), v in sorted(sims.items())}
    if "spectrum" in analyses:
        ranks = [effective_rank(s) for s in delta_weight_spectrum(model).values()]
        out["effective_rank_mean"] = sum(ranks) / len(ranks)
    if "probe" in analyses:
        out["probe"] = separation_probe(model, tok, data.test, n=suite.probe_examples)
    return out


def compare_runs(old, new):
    """Two results of one run key (cache, retraining): averages and per task accuracy, agreement, max score diff."""
    if old["key"] != new["key"]:
        raise ValueError(f"different runs: keys {old['key']} and {new['key']}")
    tasks = {}
    for t, a in old["predictions"].items():
        b = new["predictions"][t]
        diff = [abs(u - v) for x, y in zip(a.get("scores", []), b.get("scores", [])) for u, v in zip(x, y)]
        tasks[t] = {"old": old["tasks"][t]["accuracy"], "new": new["tasks"][t]["accuracy"], "n": len(a["pred"]),
                    "agree": sum(x == y for x, y in zip(a["pred"], b["pred"])),
                    "max_abs_score_diff": max(diff) if diff else None}
    side = lambda r: {"machine": r["machine"], "average": r["average"], "wall_s": r["wall_s"],  # noqa: E731
                      "ce_last5": r.get("curve", {}).get("ce_last5")}
    return {"label": old["label"], "seed": old.get("seed"), "key": old["key"], "old": side(old), "new": side(new),
            "average_diff": new["average"] - old["average"], "tasks": tasks,
            "agree": sum(v["agree"] for v in tasks.values()), "n": sum(v["n"] for v in tasks.values())}


class Grid:
    """Methods × seeds (and the base model) on one suite: `run()` trains what is missing, `results()` reads."""

    def __init__(self, name, suite: Suite, methods: dict, seeds, results_dir=RESULTS, work_dir=WORK):
        self.name, self.suite, self.methods, self.seeds = name, suite, methods, list(seeds)
        self.runs_dir, self.work_dir = Path(results_dir) / "runs", Path(work_dir)
        self._data, self._keyed, self._base_model, self._tok = None, None, None, None
        self.damaged, self.busy = [], []  # result files moved to runs/damaged/; runs another driver is training

    @property
    def data(self) -> Data:
        """The suite's data (training needs it: an `error:` exit where it is missing)."""
        if self._data is None:
            self._data = load_data(self.suite)
        return self._data

    def keyed(self):
        """Is the suite's prepared data here (runs found by key), or not (by `index`)?"""
        if self._keyed is None:
            self._data = self._data or load_data(self.suite, need=False)
            self._keyed = self._data is not None
        return self._keyed

    def key(self, label, seed):
        return run_key(train_config(self.suite, self.methods[label].options, seed, self.work_dir), self.suite,
                       self.data)

    def path(self, label, seed):
        return self.runs_dir / f"{self.key(label, seed)}.json"

    def base_path(self):
        return self.runs_dir / f"base-{base_key(self.suite, self.data)}.json"

    def load(self, path: Path):
        """The result in `path`, or None; a damaged one is moved to runs/damaged/ with a note."""
        try:
            r = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            why = f"not valid JSON ({str(e)[:60]})"
        else:
            why = problem(r, path.stem.removeprefix("base-"))
        if why is None:
            return r
        dest = self.runs_dir / "damaged" / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(exist_ok=True)
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return None  # another process moved it first
        self.damaged.append(path.name)
        print(f"damaged cached run {path}: {why}; moved to {dest} (it counts as missing: "
              f"`python experiments/claims.py run` trains it again)", file=sys.stderr, flush=True)
        return None

    def index(self):
        """{result_id: path} over the runs directory; an id of two files (different data) is left out."""
        files = sorted(self.runs_dir.glob("*.json"))
        stamp = lambda: [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists()]  # noqa: E731
        if _INDEX.get(self.runs_dir, (None,))[0] != stamp():
            found = {}
            for p in files:
                if (r := self.load(p)) is not None:
                    found.setdefault(result_id(r), []).append(p)
            for ps in found.values():
                if len(ps) > 1:
                    print(f"note: {', '.join(p.name for p in ps)} are one run on different data: without the "
                          f"prepared data ({self.suite.data_dir}) neither is read", file=sys.stderr)
            _INDEX[self.runs_dir] = (stamp(), {i: ps[0] for i, ps in found.items() if len(ps) == 1})
        return _INDEX[self.runs_dir][1]

    def find(self, label, seed):
        """The result file of a run (or "base"), or None: by key where the data is here, else by `run_id`."""
        if self.keyed():
            p = self.base_path() if label == "base" else self.path(label, seed)
            return p if p.exists() else None
        desc = self.suite.describe()
        i = base_id(desc) if label == "base" else run_id(desc, dataclasses.asdict(
            train_config(self.suite, self.methods[label].options, seed, self.work_dir)))
        return self.index().get(i)

    def cached(self, label, seed):
        p = self.find(label, seed)
        r = None if p is None else self.load(p)
        if r is not None and self.keyed() and "data" in r and r["data"] != self.data_fp(label == "base"):
            raise SystemExit(f"error: {p} records other data fingerprints than its key's: move it aside and rerun")
        return r

    def data_fp(self, base=False):
        """The data fingerprints a result stores (test set; and training pool for a trained run)."""
        fp = {"test": self.data.test_fp} if base else {"test": self.data.test_fp, "train": self.data.train_fp}
        return {**fp, "dev": self.data.dev_fp} if self.data.dev_fp else fp

    def results(self):
        """{label: [finished seeds' results]} plus "base" (or None); runs on different data are an `error:` exit."""
        out = {label: [r for s in self.seeds if (r := self.cached(label, s)) is not None] for label in self.methods}
        out["base"] = self.cached("base", None)
        runs = [r for rs in out.values() if rs for r in (rs if isinstance(rs, list) else [rs]) if "data" in r]
        for what in ("test", "train"):
            seen = {r["data"][what]: r["key"] for r in runs if what in r["data"]}
            if len(seen) > 1:
                raise SystemExit(f"error: cached runs {', '.join(seen.values())} of grid {self.name} in "
                                 f"{self.runs_dir} were made on different {what} data: prepare the data "
                                 f"(data/prepare.py) so that each run is read by its key, or move the stale ones aside")
        return out

    def missing(self):
        """[(label, seed)] not cached (or damaged), seed by seed."""
        return [(label, s) for s in self.seeds for label in self.methods if self.cached(label, s) is None]

    # ------------------------------------------------------------------------------------------------ running

    def base_model(self):
        if self._base_model is None:
            # scored where train.py trains: on a GPU with a bf16 base (as eval.py), fp32 on a CPU
            device = system.pick_device()
            self._base_model = nanoalign.plumbing.load_model(self.suite.model, dtype=system.base_dtype(device),
                                                             device=device).eval()
            self._tok = nanoalign.plumbing.load_tokenizer(self.suite.model)
        return self._base_model, self._tok

    def evaluate(self, model, names, split="test"):
        t0 = time.perf_counter()
        res = evaluate(model, self._tok, getattr(self.data, split), mode=self.suite.mode,
                       task_ids={t: i for i, t in enumerate(names)}, progress=progress_bar("eval"),
                       scorer=fast.choice_logprobs)  # the cached runs' scorer, bitwise
        return res, time.perf_counter() - t0

    def dev_result(self, model, names):
        """The model scored on the suite's dev split ({} without one): what every choice is made on."""
        if self.data.dev is None:
            return {}
        res, eval_s = self.evaluate(model, names, "dev")
        return {"dev": {"tasks": without_records(res), "average": sum(r["accuracy"] for r in res.values()) / len(res),
                        "eval_s": round(eval_s, 1), "predictions": compact_predictions(res)}}

    def run_base(self):
        if (r := self.cached("base", None)) is not None:
            return r
        model, _ = self.base_model()
        t0 = time.perf_counter()
        res, eval_s = self.evaluate(model, sorted(self.suite.tasks))
        out = {"label": "base", "key": base_key(self.suite, self.data), "suite": self.suite.describe(),
               "data": self.data_fp(base=True), "machine": machine(), "eval_s": round(eval_s, 1),
               "wall_s": round(time.perf_counter() - t0, 1),
               "tasks": without_records(res), "average": sum(r["accuracy"] for r in res.values()) / len(res),
               "predictions": compact_predictions(res), **self.dev_result(model, sorted(self.suite.tasks))}
        write_json(self.base_path(), out)
        print(f"[{self.name}] base: average {100 * out['average']:.1f}% in {out['wall_s']:.0f} s", flush=True)
        return out

    def run_one(self, label, seed):
        method = self.methods[label]
        key = self.key(label, seed)
        cfg = train_config(self.suite, method.options, seed, self.work_dir)
        cfg.run_name = key
        run_dir = self.work_dir / key
        has_ckpt = any((run_dir / d / "state.json").exists() for d in ("checkpoint", "checkpoint.old"))
        if run_dir.exists() and not has_ckpt:
            shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to resume
        cfg.resume = has_ckpt
        t0 = time.perf_counter()
        trained = launch.train(cfg)
        if trained is None:
            raise RuntimeError(f"run {label} seed {seed} stopped before its last step (interrupted); rerun to resume")
        train_s = time.perf_counter() - t0
        base, tok = self.base_model()
        model = copy.deepcopy(base)
        load_adapter(model, run_dir / "adapter")
        names = sorted(self.suite.tasks)
        analysis = analyse(model, tok, names, self.data, self.suite, method.analyses)
        trainable = count_trainable(model)
        try:
            merge_adapters(model)  # mergeable adapters score at base-model speed; equal to unmerged (tests)
            merged = True
        except ValueError:
            merged = False
        res, eval_s = self.evaluate(model, names)
        dev = self.dev_result(model, names)
        del model
        out = {"label": label, "seed": seed, "key": key, "grid": self.name, "suite": self.suite.describe(),
               "options": method.options, "config": dataclasses.asdict(cfg), "data": self.data_fp(),
               "train_sizes": self.data.train_sizes, "machine": machine(), "train_s": round(train_s, 1),
               "eval_s": round(eval_s, 1), "wall_s": round(time.perf_counter() - t0, 1), "resumed": has_ckpt,
               "trainable": trainable,
               "merged_for_eval": merged, "curve": curve_summary(run_dir / "log.jsonl"), "analysis": analysis,
               "tasks": without_records(res), "average": sum(r["accuracy"] for r in res.values()) / len(res),
               "predictions": compact_predictions(res), **dev}
        write_json(self.path(label, seed), out)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the adapter stays; optimizer state is done
        return out

    def recheck(self, label, seed, scratch: Path):
        """Retrain one cached run (or re-score "base") into `scratch` and `compare_runs` with the cache."""
        other = Grid(self.name, self.suite, self.methods, self.seeds, results_dir=Path(scratch) / "results",
                     work_dir=Path(scratch) / "work")
        if (old := self.cached(label, seed)) is None:  # "base" is found whatever the seed
            raise ValueError(f"{label} seed {seed} is not in the cache ({self.runs_dir}): nothing to recheck")
        return compare_runs(old, other.run_base() if label == "base" else
                            other.cached(label, seed) or other.run_one(label, seed))

    def claimed(self, label, seed, fn):
        """fn() under the run's lock, or None where another driver holds it (noted in self.busy) or cached it."""
        name = f"base-{base_key(self.suite, self.data)}" if label == "base" else self.key(label, seed)
        lock = self.work_dir / f"{name}.lock"
        holder = claim(lock)
        if holder is not None:
            self.busy.append((label, seed, holder))
            print(f"[{self.name}] {label}{'' if seed is None else f' seed {seed}'}: being trained by process "
                  f"{holder} ({lock}): skipped", flush=True)
            return None
        try:
            return fn() if self.cached(label, seed) is None else None  # another driver may have just finished it
        finally:
            lock.unlink(missing_ok=True)

    def run(self, limit=None):
        """Train and evaluate what is missing, seed by seed, one line per run with an ETA."""
        self.busy = []
        self.claimed("base", None, self.run_base)
        todo = self.missing()[:limit]
        times = []
        for i, (label, seed) in enumerate(todo, 1):
            t0 = time.perf_counter()
            r = self.claimed(label, seed, lambda: self.run_one(label, seed))  # noqa: B023 (called at once)
            if r is None:
                continue
            times.append(time.perf_counter() - t0)
            left = (len(todo) - i) * sum(times) / len(times)
            tasks = ", ".join(f"{t} {100 * v['accuracy']:.1f}{'c' if v['collapsed'] else ''}"
                              for t, v in r["tasks"].items())
            print(f"[{self.name} {i}/{len(todo)}] {label} seed {seed}: average {100 * r['average']:.1f}% ({tasks}); "
                  f"{times[-1] / 60:.1f} min; ETA {left / 3600:.1f} h", flush=True)
        if self.busy:
            print(f"[{self.name}] skipped {len(self.busy)} run(s) another driver is training: "
                  + "; ".join(f"{label}{'' if s is None else f' seed {s}'} ({h})" for label, s, h in self.busy),
                  flush=True)
        return self.results()
