"""What the tutorials share (none of it is the method): flags, the tiny random model of `--tiny`, a real-task mix,
the mechanism cells' toy, the claim readers' modes, atomic JSON/PNG writing.

Mechanism tutorials (01, 02, 07), `parser`: smollm2-135m on CPU; `--tiny` a 2-layer random Llama (the smoke test);
`--full` the paper's GPU-scale setting. Claim readers (03-06, 08-10), `reader_parser`: read the cached grid and name
the missing runs; `--rerun` train them first; `--tiny` a tiny grid, trained and rendered; `--full` print the
paper's setting. All write JSON and PNG to out/tutorials/ (`--out DIR`), or with `--update` to tutorials/results/.
"""

import argparse
import atexit
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `nanoalign`, `experiments` and `train` import from a plain checkout

import nanoalign  # noqa: E402  (before torch: it sets OMP_WAIT_POLICY, nanoalign/__init__.py)
import nanoalign.plumbing  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments import paper  # noqa: E402
from experiments.analysis import head_cosine_similarity  # noqa: E402
from experiments.grid import Suite, machine  # noqa: E402  (where and when a result was measured)
from experiments.reports import Grids, bar  # noqa: E402
from nanoalign.adapters import adapter_context, apply_adapter  # noqa: E402
from nanoalign.data import BalancedBatcher, answer_positions, encode_tasks  # noqa: E402
from nanoalign.plumbing.datasets import data_file, load_tasks  # noqa: E402
from nanoalign.plumbing.tasks import TASK_SUITE  # noqa: E402
from nanoalign.model import CausalLM, ModelConfig  # noqa: E402
from nanoalign.plumbing.system import write_atomic, write_json  # noqa: E402  (atomic: never half a file)

RESULTS = ROOT / "tutorials" / "results"  # the committed renders: written with --update only
OUT = ROOT / "out" / "tutorials"  # git-ignored: where a tutorial writes by default
TINY_OUT = ROOT / "out" / "tutorials-tiny"  # git-ignored: where --tiny writes by default
MLP = ("gate_proj", "up_proj", "down_proj")  # the Align-LoRA / R-LoRA / HydraLoRA targets (METHODS §1)

# Qwen2.5-3B as in its config.json: the model of Align-LoRA's Table 1 (METHODS §1 parameter table). Meta device only.
QWEN25_3B = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
             "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
             "num_key_value_heads": 2, "tie_word_embeddings": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
             "rope_theta": 1e6, "max_position_embeddings": 32768}


class Parser(argparse.ArgumentParser):
    """argparse with the tutorial's docstring as help, `modes` [(flag, help)] exclusive, and --out / --update; it
    resolves `args.out`, `args.update` (are the committed results written, also via --out?) and --full's model."""

    def __init__(self, doc, modes, full_model=None):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.full_model = full_model
        size = self.add_mutually_exclusive_group()
        for flag, text in modes:
            size.add_argument(flag, action="store_true", help=text)
        where = self.add_mutually_exclusive_group()
        where.add_argument("--out", default=None, help=f"directory for the results JSON and PNG (default "
                           f"{OUT.relative_to(ROOT)}; --tiny: {TINY_OUT.relative_to(ROOT)})")
        where.add_argument("--update", action="store_true", help=f"write the committed {RESULTS.relative_to(ROOT)}/ "
                           "(the results the README shows) instead")

    def parse_args(self, args=None, namespace=None):
        args = super().parse_args(args, namespace)
        tiny = getattr(args, "tiny", False)
        args.out = Path(args.out or (RESULTS if args.update else TINY_OUT if tiny else OUT))
        args.update = args.out.resolve() == RESULTS.resolve()
        if args.update and tiny:
            raise SystemExit(f"error: --tiny would write its smoke-test results over the committed {RESULTS}: drop "
                             f"--update (or --out)")
        if args.full and self.full_model:
            args.model = self.full_model
        return args


def parser(doc, full_model=None):
    """The mechanism tutorials' flags; --full sets --model to `full_model`."""
    p = Parser(doc, [("--tiny", "tiny random model, a handful of steps (smoke test)"),
                     ("--full", "the paper's GPU-scale setting (see the docstring)")], full_model)
    p.add_argument("--model", default="smollm2-135m", help="alias or local directory (ignored with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    return p


# ----------------------------------------------------------------------------- real tasks, or the builtin suite

# Tutorial 02's real mix: Align-LoRA tasks of both families with short prompts, so a CPU step stays cheap
REAL_TASKS = ("sst2", "cola", "piqa", "siqa", "openbookqa")
FULL_TASKS = ("sst2", "cola", "mrpc", "qnli", "rte", "boolq", "piqa", "siqa", "arc-easy", "arc-challenge",
              "openbookqa")
DATA_DIR = ROOT / "data"  # where data/prepare.py writes <suite>/<task>-<split>.jsonl (git-ignored)


def default_source():
    """The original benchmark files: $NANOALIGN_DATA, else ../shared/data beside the repo, else None."""
    for d in (os.environ.get("NANOALIGN_DATA"), ROOT.parent / "shared" / "data"):
        if d and Path(d).is_dir():
            return Path(d)
    return None


def pick_data(args, data_dir=DATA_DIR):
    """(data spec, data dir): --data; else the real tasks (prepared once by data/prepare.py) when their files are
    there; else the builtin suite with a notice (always with --tiny: byte-level tokens make real prompts 4x longer),
    an `error:` exit with --update, whose committed results are real-task ones."""
    data_dir, data = Path(data_dir), args.data or ("builtin" if args.tiny else None)
    if data is None:
        tasks = FULL_TASKS if args.full else REAL_TASKS
        source = Path(args.source) if args.source else default_source()
        if args.source and not source.is_dir():
            raise SystemExit(f"error: --source {args.source} is not a directory; give the folder holding glue/ and "
                             f"commonsense/ with the original files, or leave --source out")
        missing = [t for t in tasks if not data_file(data_dir, t, "train").exists()]
        if missing and source is not None:
            for suite in sorted({TASK_SUITE[t] for t in missing}):
                names = ",".join(t for t in missing if TASK_SUITE[t] == suite)
                print(f"preparing {names} from {source} (data/prepare.py, once)")
                subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), suite, "--source", str(source),
                                "--tasks", names, "--out", str(data_dir)], stdout=subprocess.DEVNULL)  # errors: below
            missing = [t for t in tasks if not data_file(data_dir, t, "train").exists()]
        data = ",".join(tasks)
        if missing:
            print(f"NOTICE: real task files not found ({', '.join(missing)}; looked in {data_dir} and "
                  f"{source or '$NANOALIGN_DATA / ../shared/data'}): falling back to the builtin suite (5 synthetic "
                  f"tasks). Pass --source DIR with the original GLUE/commonsense files for real tasks.")
            data = "builtin"
    if data == "builtin" and getattr(args, "update", False):
        raise SystemExit(f"error: --update would replace the committed real-task results in {RESULTS} with a run on "
                         f"the builtin synthetic tasks: pass --source DIR with the original GLUE/commonsense files (or "
                         f"prepare them with data/prepare.py), or drop --update")
    return data, data_dir


# ----------------------------------------------------------------------------- the tiny model of --tiny

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True, "hidden_act": "silu"}


def tiny_model_dir(d=None) -> Path:
    """A model directory like a real one: byte-level tokenizer.json, config.json, random model.safetensors. Deleted
    at exit when `d` is None."""
    from safetensors.torch import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if d is None:
        d = Path(tempfile.mkdtemp(prefix="nanoalign-tiny-"))
        atexit.register(shutil.rmtree, d, True)
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
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
    model, tok = nanoalign.plumbing.load_model(name), nanoalign.plumbing.load_tokenizer(name)
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {'the tiny random model' if args.tiny else name}: {n:,} parameters "
          f"({time.perf_counter() - t0:.1f} s)")
    return model.eval(), tok, name


# ------------------------------------------------------ the claim tutorials' mechanism cells, and tutorial 02's steps

TOY_TASKS = ("alphabet-first", "colour-review", "last-letter")  # three builtin tasks: three task pairs to align


def toy(kind="lora", seed=0, per_task=2, dropout=0.0, **options):
    """The mechanism cells' toy: the tiny random Llama with a `kind` adapter (rank 4, α 8, 3 heads, gate/up/down).
    Returns (model in train mode, task-balanced batches of TOY_TASKS, (encoded pools, pad id) for MetaSampler)."""
    d = toy_dir()
    model, tok = nanoalign.plumbing.load_model(str(d)), nanoalign.plumbing.load_tokenizer(str(d))
    torch.manual_seed(seed)
    apply_adapter(model, kind, rank=4, alpha=8, heads=3, dropout=dropout, targets=MLP, **options)
    pools = encode_tasks(tok, load_tasks(",".join(TOY_TASKS), "train", max_per_task=16, seed=seed), 128)
    return model.train(), BalancedBatcher(pools, per_task=per_task, seed=seed, pad_id=tok.pad_id), (pools, tok.pad_id)


toy_dir = functools.cache(tiny_model_dir)  # one tiny model for all the toys of a run


def pinned(out, *tests):
    """A mechanism cell's numbers with the tests that pin the same facts (printed; the JSON keeps them)."""
    print("  pinned by " + ", ".join(tests))
    return {**out, "tests": list(tests)}


def head_cos(model):
    """(mean, min) of the inter-head cosines of B over the adapted modules; (None, None) while the heads are zero."""
    vals = [v for v in head_cosine_similarity(model).values() if not math.isnan(v)]
    return (sum(vals) / len(vals), min(vals)) if vals else (None, None)


def lm_loss(model, batch):
    """Cross-entropy on the answer tokens, inside adapter_context so MTL-LoRA sees the task ids."""
    at, targets = answer_positions(batch["labels"])
    with adapter_context(model, task_ids=batch["task_ids"]):
        logits = model(batch["input_ids"], batch["attention_mask"], logits_at=at)
    return F.cross_entropy(logits.float(), targets)


# ----------------------------------------------------------------------------- the claim readers (03-06, 08-10)

def reader_parser(doc):
    """The claim readers' flags."""
    return Parser(doc, [("--rerun", "train the runs missing from the cached grid (resumes it; hours on a CPU), then "
                                    "render"),
                        ("--tiny", "smoke test: a tiny grid in a temp dir, trained and rendered"),
                        ("--full", "print the paper's setting and how to run it (a GPU box)")])


def parse_args(doc, claims, full=None):
    """The reader's flags; with --full, print the paper's setting (or call the tutorial's own `full`) and exit."""
    args = reader_parser(doc).parse_args()
    if args.full:
        full() if full else full_scale(claims)
        raise SystemExit(0)
    return args


def tiny_suite(d: Path):
    """The smoke test's suite: the tiny random model, 2 builtin tasks, 3 steps, 8 test examples per task."""
    return Suite(("alphabet-first", "colour-review"), model=str(tiny_model_dir(d / "model")), steps=3,
                 batch_per_task=1, lr=1e-2, warmup=1, seq_len=160, train_pool=16, test_per_task=8,
                 data_dir=str(d / "data"), probe_examples=4)


def claim_grids(tiny=False, train=False, stream=None):
    """reports.Grids of the cache, or with `tiny` of a tiny suite in a temporary directory, trained when read."""
    if not tiny:
        return Grids(train=train, stream=stream)
    d = Path(tempfile.mkdtemp(prefix="nanoalign-tiny-grid-"))
    atexit.register(shutil.rmtree, d, True)
    where = {"suite": tiny_suite(d), "seeds": [0, 1], "results_dir": d / "results", "work_dir": d / "work",
             "controls": False}  # the controls repeat their rows with one option changed: not smoke-tested
    return Grids(where, train=True, tiny=True, stream=stream)


def full_scale(claims):
    """--full: the paper's setting of each claim and how to run its grid at that scale."""
    for c in claims:
        model, tasks, what = paper.SETTINGS[c]
        print(f"claim {c} at the paper's scale: {model}, tasks {', '.join(tasks)}; {what}.")
    model, tasks, _ = paper.SETTINGS[claims[0]]
    tasks = tasks if all(" " not in t for t in tasks) else ("...",)
    print("\nThis needs a GPU box and real weights. There, set SUITE in experiments/claims.py to that setting, e.g.\n"
          f"    Suite(tasks={tasks}, model=\"{model.lower()}\", fmt=\"label\", mode=\"generate\",\n"
          "          steps=2000, batch_per_task=10, lr=2e-4, warmup=100, seq_len=512, test_per_task=0)\n"
          f"and run\n    python experiments/claims.py run --only {','.join(claims)}\n"
          "then this tutorial without flags renders it.")


def finish(args, stem, results, draw=None, title=""):
    """Write <out>/<stem>.json and, with matplotlib and a figure from draw(plt), <out>/<stem>.png titled `title`."""
    results = {"meta": machine(), "mode": "tiny" if args.tiny else "rerun" if args.rerun else "read", **results}
    print(f"\nwrote {write_json(args.out / f'{stem}.json', results)}")
    plt = pyplot() if draw else None
    fig = draw(plt) if plt is not None else None
    if fig is not None:
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        print(f"wrote {save_figure(fig, args.out / f'{stem}.png')}")


def reference_lines(ax, c, label, text):
    """Method `label`'s suite average as a line with its ± SE band, and the base model's and majority label's."""
    r = c.row(label)
    if r:
        ax.axhline(r["average"], color="k", lw=1, label=text)
        ax.axhspan(r["average"] - bar(r["se"]), r["average"] + bar(r["se"]), color="gray", alpha=0.2)
    for row, ls, what in ((c.report["base"], "--", "base model"), (c.majority(), ":", "majority label")):
        if row:
            ax.axhline(row["average"], color="gray", ls=ls, lw=1, label=what)


# ----------------------------------------------------------------------------- output

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
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
