"""Plumbing shared by the tutorials: the command-line flags, the tiny random model of `--tiny`, a few bare optimizer
steps, and atomic JSON/PNG writing. Nothing here is part of the method; the tutorials themselves call nanoalign.

Every tutorial takes the same three size flags:

    (default)  smollm2-135m on 2 CPU cores, a few minutes at most
    --tiny     a 2-layer random Llama (hidden 64) with a byte-level tokenizer, built here in a temp dir: the smoke test
    --full     the paper's GPU-scale setting, documented in each tutorial (model, tasks, steps)

and `--out DIR` (default tutorials/results) for the JSON and PNG they write.
"""

import os

# Before torch starts OpenMP: on a shared CPU a spin-waiting thread stalls every parallel op (see train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import atexit
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `import nanoalign` / `import train` work from a plain checkout

import nanoalign  # noqa: E402
from nanoalign.data import BalancedBatcher, answer_positions, encode_tasks, load_tasks  # noqa: E402
from nanoalign.model import CausalLM, ModelConfig  # noqa: E402

RESULTS = ROOT / "tutorials" / "results"
MLP = ("gate_proj", "up_proj", "down_proj")  # the Align-LoRA / R-LoRA / HydraLoRA targets (METHODS §1)

# Qwen2.5-3B as in its config.json: the model of Align-LoRA's Table 1 (METHODS §1 parameter table). Meta device only.
QWEN25_3B = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
             "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
             "rope_theta": 1e6, "max_position_embeddings": 32768}


def parser(doc: str) -> argparse.ArgumentParser:
    """argparse with the shared flags; the tutorial's docstring is the help text."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny random model, a handful of steps (smoke test)")
    size.add_argument("--full", action="store_true", help="the paper's GPU-scale setting (see the docstring)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the results JSON and PNG (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="alias or local directory (ignored with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    return p


def add_training_flags(p, steps, seeds, evaluate=True):
    """The flags of the tutorials that train (03-06, 08, 09): steps, seeds, data and where the originals are."""
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {steps[0]}; --tiny "
                   f"{steps[1]}; --full {steps[2]})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per method (default {seeds[0]}; --tiny {seeds[1]})")
    p.add_argument("--data", default=None, help="tasks for train.py: a suite, a comma list of tasks or a .jsonl file "
                   f"(default: {','.join(REAL_TASKS)} from --source when present, else builtin; --full: "
                   f"{','.join(FULL_TASKS)})")
    p.add_argument("--source", default=None, help="the original benchmark files (default: $NANOALIGN_DATA or "
                   "../shared/data beside the repo)")
    if evaluate:
        p.add_argument("--eval-max", type=int, default=None, help="test examples per task (default 30; --tiny 8; "
                       "--full 200)")
    p.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 autocast: auto = on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else off")
    return p


# ----------------------------------------------------------------------------- real tasks, or the builtin suite

# Five real tasks (Align-LoRA's Table 1 is a 5-task suite whose identities are not known, METHODS §5.1), from the
# Align-LoRA task pool, two families (GLUE classification, commonsense multiple choice), picked for short prompts
# (median 39-79 SmolLM2 tokens) so that a CPU step of one example per task stays well under a second.
REAL_TASKS = ("sst2", "cola", "piqa", "siqa", "openbookqa")
FULL_TASKS = ("sst2", "cola", "mrpc", "qnli", "rte", "boolq", "piqa", "siqa", "arc-easy", "arc-challenge",
              "openbookqa")
SUITE_OF = {"sst2": "glue", "cola": "glue", "mrpc": "glue", "qnli": "glue", "rte": "glue", "boolq": "commonsense",
            "piqa": "commonsense", "siqa": "commonsense", "arc-easy": "commonsense", "arc-challenge": "commonsense",
            "openbookqa": "commonsense"}
DATA_DIR = ROOT / "data"  # where data/prepare.py writes <suite>/<task>-<split>.jsonl (git-ignored)


def default_source():
    """The original benchmark files: $NANOALIGN_DATA, else ../shared/data beside the repo, else None."""
    for d in (os.environ.get("NANOALIGN_DATA"), ROOT.parent / "shared" / "data"):
        if d and Path(d).is_dir():
            return Path(d)
    return None


def pick_data(args, data_dir=DATA_DIR):
    """(data spec for train.py, data dir): --data if given; else the real tasks (prepared from the originals once,
    by data/prepare.py) when their files are there; else the builtin suite, with a printed notice. --tiny keeps the
    builtin suite unless --data is given (the tiny byte-level tokenizer makes real prompts 4x longer)."""
    if args.data:
        return args.data, Path(data_dir)
    if args.tiny:
        return "builtin", Path(data_dir)
    tasks = FULL_TASKS if args.full else REAL_TASKS
    source = Path(args.source) if args.source else default_source()
    if args.source and not source.is_dir():
        raise SystemExit(f"error: --source {args.source} is not a directory; give the folder holding glue/ and "
                         f"commonsense/ with the original files, or leave --source out")
    missing = [t for t in tasks if not (Path(data_dir) / SUITE_OF[t] / f"{t}-train.jsonl").exists()]
    if missing and source is not None:
        for suite in sorted({SUITE_OF[t] for t in missing}):
            names = ",".join(t for t in missing if SUITE_OF[t] == suite)
            print(f"preparing {names} from {source} (data/prepare.py, once)")
            subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), suite, "--source", str(source),
                            "--tasks", names, "--out", str(data_dir)], stdout=subprocess.DEVNULL)  # errors: below
        missing = [t for t in tasks if not (Path(data_dir) / SUITE_OF[t] / f"{t}-train.jsonl").exists()]
    if missing:
        print(f"NOTICE: real task files not found ({', '.join(missing)}; looked in {data_dir} and "
              f"{source or '$NANOALIGN_DATA / ../shared/data'}): falling back to the builtin suite (5 synthetic "
              f"tasks). Pass --source DIR with the original GLUE/commonsense files for real tasks.")
        return "builtin", Path(data_dir)
    return ",".join(tasks), Path(data_dir)


def autocast_mode(flag):
    """train.py's --autocast value for this machine: on CPU, bf16 autocast only where the CPU has native bf16 matmuls
    (measured on a 2-core AVX512-BF16 EPYC: a SmolLM2-135M training step 1.75x faster, a forward 3.3x; without
    native bf16 it is slower than fp32)."""
    if flag != "auto":
        return flag
    if torch.cuda.is_available():
        return "auto"
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return "bf16" if native else "off"


def base_dtype(autocast):
    """With bf16 autocast on CPU the frozen base is stored in bf16 too (no per-step weight casts, half the memory:
    another ~12% per step, measured as above); adapters and AdamW state stay fp32 either way."""
    return "bfloat16" if autocast == "bf16" and not torch.cuda.is_available() else "auto"


# ----------------------------------------------------------------------------- train one run, evaluate it

def train_run(model_name, adapter, seed, out_root, data, data_dir, steps, autocast, rank, heads=3, targets=MLP,
              seq_len=128, lr=5e-4, **overrides):
    """Train one adapter with train.py's loop (`train.train`), without train.py's own evaluation; return (the base
    model with the trained adapter loaded, in eval mode; train.train's result dict with the log records).
    seq_len 128 cuts the few long prompts from the left (PIQA's tail reaches 350 tokens) so that a micro-batch padded
    to its longest example stays cheap; the answer and the "Answer:" cue always survive (nanoalign.data).
    lr 5e-4 instead of train.py's 2e-3 (tuned on the synthetic builtin suite): on the real mix, one seed of LoRA r=8,
    30 steps, scored an average of 46.7% at 5e-4 and 40.7% at 2e-3 (the base model: ~50%)."""
    import train
    from nanoalign.adapters import load_adapter
    cfg = train.TrainConfig(model=model_name, adapter=adapter, rank=rank, heads=heads, targets=",".join(targets),
                            data=data, data_dir=str(data_dir), max_per_task=500, max_steps=steps, lr=lr,
                            warmup=max(1, steps // 10), seed=seed, eval_max=0, autocast=autocast, seq_len=seq_len,
                            dtype=base_dtype(autocast), out=str(out_root),
                            run_name=f"{adapter}-r{rank}-seed{seed}", log_every=max(1, steps // 4),
                            ckpt_every=10**6)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    result = train.train(cfg)
    log = [json.loads(line) for line in (Path(out_root) / cfg.run_name / "log.jsonl").read_text().splitlines()]
    result["log"] = [r for r in log if "ce" in r]
    model = load_eval_model(model_name, autocast)
    load_adapter(model, Path(out_root) / cfg.run_name / "adapter")
    return model.eval(), result


def load_eval_model(model_name, autocast):
    """The base model for scoring, in eval mode, in the dtype training used (see base_dtype)."""
    dtype = torch.bfloat16 if base_dtype(autocast) == "bfloat16" else torch.float32
    return nanoalign.load_model(model_name, dtype=dtype).eval()


def eval_tasks(data, data_dir, n, names):
    """The same n test examples per task for every method and seed (fixed sampling seed 0)."""
    tasks = load_tasks(data, "test", data_dir=data_dir, max_per_task=n, seed=0)
    return {t: tasks[t] for t in names if t in tasks}


def accuracy(model, tok, tasks, names, autocast):
    """Per-task accuracy by option log-likelihood (nanoalign.evaluate, tests/test_eval.py), plus the unweighted
    average as the paper reports it, in %."""
    from nanoalign.evaluate import accuracies, evaluate
    with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                        enabled=autocast == "bf16"):
        acc = accuracies(evaluate(model, tok, tasks, mode="loglik", task_ids={t: i for i, t in enumerate(names)}))
    acc = {t: 100 * a for t, a in acc.items()}
    return {**acc, "average": sum(acc.values()) / len(acc)}


def spread(vals):
    """mean, std (n-1), min and max over seeds."""
    vals = [float(v) for v in vals]
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def compare(a: dict, b: dict):
    """How method a stands against b over seeds (spreads from `spread`): the mean difference, its standard error
    sqrt(s_a²/n_a + s_b²/n_b) over seeds, whether it exceeds 2 standard errors ("clear"), and whether the seed ranges
    are disjoint. Test-set noise is not in the standard error: the test examples are the same for every run."""
    diff = a["mean"] - b["mean"]
    se = (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5
    return {"diff": diff, "se": se, "a_higher": diff > 0, "clear": abs(diff) > 2 * se,
            "separated": a["min"] > b["max"] or b["min"] > a["max"]}


# ----------------------------------------------------------------------------- the tiny model of --tiny

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True, "hidden_act": "silu"}


def tiny_model_dir(d=None) -> Path:
    """A model directory nanoalign loads like a real one: a byte-level tokenizer (one token per byte, no merges,
    plus <eos>/<pad>), config.json and random weights in model.safetensors. Deleted at exit when `d` is None."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if d is None:
        d = Path(tempfile.mkdtemp(prefix="nanoalign-tiny-"))
        atexit.register(shutil.rmtree, d, True)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<eos>", "<pad>")])
    tk.save(str(d / "tokenizer.json"))
    write_json(d / "tokenizer_config.json", {"eos_token": "<eos>", "pad_token": "<pad>"})
    eos, pad = tk.token_to_id("<eos>"), tk.token_to_id("<pad>")
    cfg = {**TINY, "vocab_size": tk.get_vocab_size(), "bos_token_id": None, "eos_token_id": eos, "pad_token_id": pad}
    write_json(d / "config.json", cfg)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(cfg))
    with torch.no_grad():  # nn.Embedding's N(0, 1) with a tied head gives logits of std ~8: start near uniform
        model.model.embed_tokens.weight.mul_(0.3)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(d / "model.safetensors"))
    return d


def load_base(args):
    """(model in eval mode, tokenizer, model name): smollm2-135m (or --model), or the tiny model for --tiny."""
    name = str(tiny_model_dir()) if args.tiny else args.model
    t0 = time.perf_counter()
    model, tok = nanoalign.load_model(name), nanoalign.load_tokenizer(name)
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {'the tiny random model' if args.tiny else name}: {n:,} parameters "
          f"({time.perf_counter() - t0:.1f} s)")
    return model.eval(), tok, name


# ----------------------------------------------------------------------------- data and a few bare steps

def task_batches(tok, data="builtin", data_dir=None, per_task=1, seed=0, max_len=128, split="train"):
    """Task-balanced micro-batches (nanoalign.data.BalancedBatcher) of a task mix (see pick_data), and the task
    names (sorted: their positions are the task ids)."""
    tasks = load_tasks(data, split, data_dir=data_dir or DATA_DIR, max_per_task=64, seed=seed)
    return BalancedBatcher(encode_tasks(tok, tasks, max_len), per_task=per_task, seed=seed, pad_id=tok.pad_id), \
        sorted(tasks)


def lm_loss(model, batch):
    """Cross-entropy on the answer tokens, inside adapter_context so MTL-LoRA sees the task ids."""
    from nanoalign.adapters import adapter_context
    at, targets = answer_positions(batch["labels"])
    with adapter_context(model, task_ids=batch["task_ids"]):
        logits = model(batch["input_ids"], batch["attention_mask"], logits_at=at)
    return F.cross_entropy(logits.float(), targets)


# ----------------------------------------------------------------------------- a probe of task representations

PROBE_KEYS = ("sep_ratio", "sep_within", "heldout_kl")


def print_representation(rep, n):
    """The probe's table, one row per setup: {label: {key: spread}} for the PROBE_KEYS."""
    w = max(map(len, rep)) + 2
    print(f"\nrepresentation on {n} held-out prompts (mean ± std over seeds):")
    print(f"  {'setup':{w}s} {'separation (between/within)':>28s} {'within':>16s} {'held-out KL':>18s}")
    for label, r in rep.items():
        print(f"  {label:{w}s} {r['sep_ratio']['mean']:18.3f} ± {r['sep_ratio']['std']:.3f} "
              f"{r['sep_within']['mean']:9.3f} ± {r['sep_within']['std']:.3f} "
              f"{r['heldout_kl']['mean']:11.4f} ± {r['heldout_kl']['std']:.4f}")


def probe_batch(exp, n):
    """n held-out examples per task (the test split, not seen in training), prompt + gold answer as in training, cut
    to 128 tokens: (input_ids, attention_mask, task_ids)."""
    from nanoalign.data import encode_example, pad_right
    rows = [(encode_example(exp.tok, ex, 128), i) for i, t in enumerate(exp.names) for ex in exp.test[t][:n]]
    ids, mask, _ = pad_right([r[0][0] for r in rows], [r[0][1] for r in rows], exp.tok.pad_id)
    return ids, mask, torch.tensor([r[1] for r in rows])


def representation(model, batch, keep_pca, autocast):
    """How far apart the tasks sit in A-output space (what Align-LoRA aligns, METHODS §3.1). One eval-mode forward
    (bf16 autocast where training used it) collects every module's A-outputs (analysis.collect_a_outputs); each
    example's A-output is averaged over its tokens; then per module the between/within task separation
    (analysis.task_separation, tests/test_analysis.py), averaged over modules, and the KL alignment loss on these
    held-out A-outputs (token level, what training minimises). keep_pca: also a 2-D PCA of all modules' pooled
    A-outputs side by side, for a plot."""
    from nanoalign.align import alignment_loss
    from nanoalign.analysis import collect_a_outputs, pca_2d, pool_a_outputs, task_separation
    ids, mask, task_ids = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
        a_outputs = collect_a_outputs(model, ids, mask, task_ids)
    feats = pool_a_outputs(a_outputs, mask)
    seps = [task_separation(f, task_ids) for f in feats.values()]
    with torch.no_grad():
        kl = alignment_loss(a_outputs, mask, task_ids, kind="kl").item()
    out = {"sep_ratio": statistics.mean(s["ratio"] for s in seps), "sep_between": statistics.mean(
           s["between"] for s in seps), "sep_within": statistics.mean(s["within"] for s in seps),
           "heldout_kl": kl}
    if keep_pca:
        xy, share = pca_2d(torch.cat(list(feats.values()), dim=1))
        out["pca"] = {"xy": xy.tolist(), "task_ids": task_ids.tolist(), "share": share.tolist()}
    return out


# ----------------------------------------------------------------------------- output

def machine() -> dict:
    """Where and when a number was measured (timings on a shared machine need this next to them)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_json(path, obj):
    """Write JSON atomically (temp file + os.replace): a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """savefig atomically, then close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def describe_diff(c):
    """'+1.23 ± 0.45 (clear; seed ranges disjoint)' for a `compare` result."""
    return (f"{c['diff']:+.2f} ± {c['se']:.2f} ({'clear' if c['clear'] else 'within seed noise'}; seed ranges "
            f"{'disjoint' if c['separated'] else 'overlap'})")


def direction_verdict(c, expect_higher=True):
    """One word-group for a claimed direction: 'reproduced' (same sign, > 2 SE), 'same direction, within noise',
    'opposite, within noise', or 'contradicted' (opposite sign, > 2 SE)."""
    if c["diff"] == 0:
        return "no difference"
    same = c["a_higher"] == expect_higher
    return ("reproduced" if c["clear"] else "same direction, within noise") if same else \
        ("contradicted" if c["clear"] else "opposite, within noise")


def judge(label, a, b, expect_higher=True, paper_diff=None):
    """`compare(a, b)` plus its `direction_verdict`, printed on one line: how 04-06 report every claimed difference."""
    c = compare(a, b)
    v = {**c, "verdict": direction_verdict(c, expect_higher)}
    if paper_diff is not None:
        v["paper_diff"] = paper_diff
    print(f"  {label}: ours {describe_diff(c)}" + (f", paper {paper_diff:+.2f}" if paper_diff is not None else "")
          + f" -> {v['verdict']}")
    return v


# ----------------------------------------------------------------------------- a grid of runs: methods x seeds

class Experiment:
    """What the training tutorials share: one model, one task mix, one test set, and `run(setups)` that trains every
    setup for every seed with train.py's loop and scores it on the same test examples.

    setups: {label: dict(adapter=..., rank=..., and any TrainConfig field)}. Each run gives a row: seed, per-task and
    average accuracy (%), trainable parameters, CE of the first/last 5 steps, seconds, plus whatever `analyse(label,
    model, result)` returns (head similarity, spectra, ...)."""

    def __init__(self, args, steps, seeds, tmp):
        self.args, self.tmp = args, Path(tmp)
        self.model_name = str(tiny_model_dir()) if args.tiny else args.model
        self.steps = args.steps or (steps[1] if args.tiny else steps[2] if args.full else steps[0])
        self.seeds = list(range(args.seed, args.seed + (args.seeds or (seeds[1] if args.tiny else seeds[0]))))
        self.data, self.data_dir = pick_data(args)
        self.autocast = autocast_mode(args.autocast)
        self.tok = nanoalign.load_tokenizer(self.model_name)
        self.names = sorted(load_tasks(self.data, "train", data_dir=self.data_dir, max_per_task=1))
        self.eval_max = args.eval_max or (8 if args.tiny else 200 if args.full else 30)
        self.test = eval_tasks(self.data, self.data_dir, self.eval_max, self.names)
        print(f"{'tiny random model' if args.tiny else self.model_name} | tasks ({self.data}): "
              f"{', '.join(self.names)} | {self.steps} steps x {len(self.seeds)} seeds | {self.eval_max} test "
              f"examples per task, option log-likelihood | autocast {self.autocast}", flush=True)

    def describe(self):
        return {"model": "tiny" if self.args.tiny else self.model_name, "data": self.data, "tasks": self.names,
                "steps": self.steps, "seeds": self.seeds, "eval_examples_per_task": self.eval_max,
                "eval_mode": "loglik", "autocast": self.autocast,
                "train": "train.py TrainConfig defaults (alpha 32, dropout 0.1, AdamW, warmup steps/10, cosine to 10%, "
                         "1 example per task per step) with lr 5e-4 and seq_len 128, unless a setup overrides them"}

    def base_accuracy(self):
        model = load_eval_model(self.model_name, self.autocast)
        return accuracy(model, self.tok, self.test, self.names, self.autocast)

    def run(self, setups, analyse=None):
        from nanoalign.adapters import count_trainable
        rows = {label: [] for label in setups}
        for seed in self.seeds:
            for label, setup in setups.items():
                t0 = time.perf_counter()
                setup = dict(setup)
                model, result = train_run(self.model_name, setup.pop("adapter"), seed, self.tmp / label, self.data,
                                          self.data_dir, self.steps, self.autocast, rank=setup.pop("rank"), **setup)
                acc = accuracy(model, self.tok, self.test, self.names, self.autocast)
                row = {"seed": seed, "accuracy": acc, "trainable": count_trainable(model),
                       "ce_first5": result["final"].get("ce_first5"), "ce_last5": result["final"].get("ce_last5"),
                       "align_last5": statistics.mean(r["align"] for r in result["log"][-5:]),
                       "step_ms_median": statistics.median(r["ms"] for r in result["log"])}
                if analyse:
                    row.update(analyse(label, model, result))
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows[label].append(row)
                print(f"==> {label} seed {seed}: average {acc['average']:.1f}% ("
                      + ", ".join(f"{t} {acc[t]:.0f}" for t in self.names)
                      + f"), ce {row['ce_first5']:.3f} -> {row['ce_last5']:.3f} ({row['seconds']} s)", flush=True)
                del model
        return rows

    def summarise(self, rows):
        """{label: {"average": spread, task: spread, ...}} over seeds."""
        return {label: {k: spread([r["accuracy"][k] for r in rs]) for k in ["average", *self.names]}
                for label, rs in rows.items()}

    def print_table(self, summary, paper=None, title="accuracy (%)"):
        """One row per setup: mean ± std over seeds of the average and each task, and the paper's number if any."""
        print(f"\n{title}, mean ± std over {len(self.seeds)} seeds, {self.eval_max} test examples per task:")
        head = f"  {'setup':22s} {'average':>14s} " + " ".join(f"{t[:10]:>12s}" for t in self.names)
        print(head + ("   paper" if paper else ""))
        for label, s in summary.items():
            line = f"  {label:22s} {s['average']['mean']:6.1f} ± {s['average']['std']:4.1f} " + " ".join(
                f"{s[t]['mean']:6.1f} ± {s[t]['std']:3.1f}" for t in self.names)
            print(line + (f"   {paper.get(label, '–')}" if paper else ""))


def bar_plot(ax, summary, rows, title="", base=None):
    """Average accuracy per setup: bar = mean over seeds, error bar = min-max, dots = the seeds; `base`: the untrained
    model's average, as a dotted line."""
    labels = list(summary)
    mean = [summary[k]["average"]["mean"] for k in labels]
    err = [[m - summary[k]["average"]["min"] for k, m in zip(labels, mean)],
           [summary[k]["average"]["max"] - m for k, m in zip(labels, mean)]]
    ax.bar(range(len(labels)), mean, yerr=err, color="lightsteelblue", capsize=3)
    for i, k in enumerate(labels):
        ax.plot([i] * len(rows[k]), [r["accuracy"]["average"] for r in rows[k]], "k.", ms=5)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    lo = min(summary[k]["average"]["min"] for k in labels)
    hi = max(summary[k]["average"]["max"] for k in labels)
    ax.set_ylim(max(0, lo - 3), min(100, hi + 3))
    ax.set(ylabel="average accuracy (%)", title=title)
    if base is not None:
        ax.axhline(base, color="gray", ls=":", lw=1, label="base model")
        ax.legend(fontsize=7)


def paper_plot(ax, paper, title):
    """The paper's numbers (METHODS §6) as bars, for the panel beside ours."""
    labels = [k for k, v in paper.items() if isinstance(v, (int, float))]
    ax.bar(range(len(labels)), [paper[k] for k in labels], color="mistyrose")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    vals = [paper[k] for k in labels]
    ax.set_ylim(min(vals) - 2, max(vals) + 2)
    ax.set(ylabel="average accuracy (%)", title=title)
