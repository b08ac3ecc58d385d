"""train.py's launcher: the command line and its checks, torchrun, the run directory and --resume, Ctrl-C, data,
model + adapter + optimizer, the log line, evaluations and the saved adapter, around the book's loop (train.py).

`train(cfg)` is one run: `setup`, `load_data`, `build`, the book's loop with `Hooks`, and `finish`.
"""

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import fast, load_model, load_tokenizer
from ..adapters import KINDS, count_trainable
from ..data import BalancedBatcher, encode_fitting
from ..evaluate import (MODES, accuracies, diagnostics_table, evaluate, generation_fallback, markdown_table,
                        task_result, without_records)
from ..meta import MetaConfig, MetaSampler, limit_shots
from .adapter_io import MAX_ALPHA, apply_adapter_checked, check_options, export_peft_dirs, save_adapter
from .checkpoint import (Checkpoint, check_fresh_start, clear_run_state, continue_run_dir, find_checkpoint,
                         load_checkpoint, read_log, save_checkpoint)
from .datasets import load_tasks, select_tasks
from .hub import HubError
from .scoring import progress_bar
from .system import (base_dtype, error_line, flops_coefficients, peak_flops, peak_memory_mib, pick_device,
                     use_autocast, write_atomic)
from .tasks import FORMATS


def book_of(cfg):
    """The train.py module that defines `cfg`'s class (`__main__` under `python train.py`)."""
    return sys.modules[type(cfg).__module__]


def flag(name):
    return "--" + name.replace("_", "-")


CHOICES = {  # the flags with a few possible values (their help texts are in TrainConfig)
    "adapter": ["auto", *KINDS], "format": list(FORMATS), "trainer": ["standard", "meta"], "meta_agg": ["mean", "sum"],
    "meta_order": [1, 2], "align_loss": ["kl", "mmd"], "align_tokens": ["all", "answer"],
    "dtype": ["auto", "float32", "bfloat16"], "autocast": ["auto", "bf16", "off"], "eval_mode": list(MODES),
}


def parse_command(argv=None, train_py=None):
    """(TrainConfig, overwrite): --overwrite is no field, so it stays out of config.json and keys derived from it.
    train_py: the train.py module, else imported from the repository root."""
    train_py = train_py or importlib.import_module("train")
    p = argparse.ArgumentParser(description=train_py.__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(train_py.TrainConfig):
        kw = dict(default=f.default, help=f.metadata["help"])
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=f.type, choices=CHOICES.get(f.name))
        p.add_argument(flag(f.name), **kw)
    p.add_argument("--overwrite", action="store_true", help="start fresh in a run directory that holds an earlier "
                   "run, deleting its checkpoints and log (without --resume or this, train.py refuses to start there)")
    ns = vars(p.parse_args(argv))
    overwrite = ns.pop("overwrite")
    return train_py.TrainConfig(**ns), overwrite


def parse_args(argv=None, train_py=None):
    return parse_command(argv, train_py)[0]


RANGES = [  # (fields, test, what the error says), checked in this order
    (["rank", "heads", "max_steps", "batch_per_task", "grad_accum", "seq_len", "log_every", "ckpt_every",
      "eval_tokens", "length_groups"], lambda v: not v < 1, "must be at least 1"),
    (["warmup", "max_per_task", "shots", "stop_at", "eval_every", "eval_max", "mmd_rows"], lambda v: not v < 0,
     "must not be negative"),
    (["lr", "alpha", "dropout", "weight_decay", "grad_clip", "align_lambda"], math.isfinite, "must be a finite number"),
    (["weight_decay", "grad_clip", "align_lambda"], lambda v: not v < 0, "must not be negative"),
]


def check_config(cfg, overwrite=False):
    """Every option in range before anything is loaded or written (else a NaN loss, or garbage in a checkpoint)."""
    for fields, ok, what in RANGES:
        bad = next((f for f in fields if not ok(getattr(cfg, f))), None)
        if bad:
            raise ValueError(f"{flag(bad)} {what}, got {getattr(cfg, bad)}")
    if not 0 < cfg.lr <= 1:
        raise ValueError(f"--lr must be in (0, 1], got {cfg.lr} (AdamW moves each weight by about the learning rate "
                         "per step; LoRA learning rates are 1e-4 to 1e-2)")
    if not 0 < cfg.alpha <= MAX_ALPHA:
        raise ValueError(f"--alpha must be in (0, {MAX_ALPHA:g}], got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.resume and overwrite:
        raise ValueError("--resume continues the run in its directory, --overwrite starts it again: pass one of them")
    if cfg.adapter == "auto":  # the default: Align-LoRA, or the plain LoRA that MeTA-LoRA trains
        cfg.adapter = "lora" if cfg.trainer == "meta" else "align"
    if cfg.trainer == "meta":
        MetaConfig.from_flags(cfg)  # each bad value names its --meta-* flag
        if book_of(cfg).aligns(cfg):
            raise ValueError("--trainer meta trains a plain LoRA without an alignment loss (METHODS §2.9): use "
                             "--adapter lora (or leave --adapter out) and no --align-any")
        if cfg.grad_ckpt or cfg.compile:
            raise ValueError("--trainer meta calls the model functionally (torch.func): drop --grad-ckpt and --compile")
    check_options(cfg.adapter, parse_options(cfg.adapter_options))


def parse_options(text):
    """--adapter-options "a=1,b=false,c=mean" -> {"a": 1, "b": False, "c": "mean"}."""
    options = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise ValueError(f"--adapter-options takes key=value pairs separated by commas, got {item!r}")
        try:
            options[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            options[key] = value
    return options


MUST_MATCH = ["model", "adapter", "rank", "alpha", "heads", "adapter_options", "targets", "data", "format", "tasks",
              "max_per_task", "pool_seed", "batch_per_task", "seq_len", "seed", "length_groups", "trainer", "shots",
              "meta_tasks", "meta_support", "meta_query"]


def check_resume_config(old: dict, cfg, say):
    """Same model, adapter and data stream as the checkpoint, or an error; other changes are listed."""
    for k in MUST_MATCH:  # adapter options compare parsed: "x=false" is "x=False"
        value = parse_options if k == "adapter_options" else (lambda v: v)
        if k in old and value(old[k]) != value(getattr(cfg, k)):
            raise ValueError(f"--resume: the checkpoint was trained with {flag(k)} {old[k]!r}, this run has "
                             f"{getattr(cfg, k)!r}; resume with the same setting")
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
               if k in old and k != "resume" and old[k] != v and not (v != v and old[k] != old[k])]
    if changed:
        say("note: resuming with changed settings: " + ", ".join(changed))


@dataclass
class Env:
    """Stage 1, setup: where and how this process runs."""
    device: torch.device
    rank: int
    world: int
    dtype: torch.dtype
    autocast: bool
    out: Path  # the run directory
    resumed: Checkpoint | None

    @property
    def master(self):
        return self.rank == 0

    def say(self, *args, **kw):
        if self.master:
            print(*args, **kw)


def setup(cfg, overwrite=False) -> Env:
    """Device, processes, seed, dtype, autocast; the checkpoint to resume from, or the refusal to start fresh.
    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; the process group is gloo on CPU, nccl on CUDA."""
    device, rank, world = pick_device(cfg.device), 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    out = Path(cfg.out) / (cfg.run_name or f"{Path(cfg.model).name}-{cfg.adapter}{'-meta' * (cfg.trainer == 'meta')}"
                                            f"-r{cfg.rank}")
    env = Env(device, rank, world, base_dtype(device, cfg.dtype), use_autocast(device, cfg.autocast), out, None)
    if cfg.resume:
        env.resumed = find_checkpoint(out / "checkpoint", env.say)
        check_resume_config(env.resumed.state["config"], cfg, env.say)
    else:
        check_fresh_start(out, overwrite)
    torch.manual_seed(cfg.seed)
    return env


@dataclass
class Data:
    """Stage 2, data: the training tasks tokenised once into the task-balanced batcher, and the held-out tasks."""
    names: list  # sorted task names: task ids are their positions (nanoalign.data)
    tok: object
    batcher: BalancedBatcher | MetaSampler
    sizes: dict
    test_tasks: dict


def load_eval_tasks(cfg, subset):
    """Held-out examples for the before/after evaluation: --eval-data, else the test split of --data."""
    if not cfg.eval_max:
        return {}
    spec = cfg.eval_data or cfg.data
    if not cfg.eval_data and (spec.endswith(".jsonl") or os.sep in spec):
        print("note: --data is a file, so there is no test split to evaluate on; pass --eval-data", file=sys.stderr)
        return {}
    tasks = load_tasks(spec, "test", data_dir=cfg.data_dir, max_per_task=cfg.eval_max, seed=cfg.pool_seed,
                       fmt=cfg.format)
    return {t: v for t, v in tasks.items() if t in subset} if subset else tasks


def load_data(cfg, env: Env) -> Data:
    """--data (the --tasks subset), tokenised; the held-out tasks; notes on what was asked but will not happen."""
    subset = sorted({t.strip() for t in cfg.tasks.split(",") if t.strip()})
    train_tasks = select_tasks(load_tasks(cfg.data, "train", data_dir=cfg.data_dir, seed=cfg.pool_seed, fmt=cfg.format,
                                          max_per_task=cfg.max_per_task or None), subset, cfg.data)
    train_tasks = limit_shots(train_tasks, cfg.shots, seed=cfg.pool_seed)  # both trainers: the same K examples
    test_tasks = load_eval_tasks(cfg, subset)
    names = sorted(train_tasks)
    tok = load_tokenizer(cfg.model)
    encoded, notes = {}, []
    with tqdm(total=sum(map(len, train_tasks.values())), desc="tokenise", leave=False, disable=not env.master) as bar:
        for t in names:  # an example whose answer leaves no room for its prompt is left out, with one note
            encoded[t], skipped = encode_fitting(tok, train_tasks[t], cfg.seq_len)
            bar.update(len(train_tasks[t]))
            if not encoded[t]:
                raise ValueError(f"every {t} training example's answer is longer than --seq-len {cfg.seq_len} "
                                 "leaves room for: raise --seq-len")
            if skipped:
                notes.append(f"note: skipped {skipped} of {len(train_tasks[t])} {t} training examples whose answer "
                             f"(+ eos) leaves no room for the prompt in --seq-len {cfg.seq_len}")
    where = dict(seed=cfg.seed, rank=env.rank, world_size=env.world, pad_id=tok.pad_id)
    batcher = MetaSampler(encoded, MetaConfig.from_flags(cfg), **where) if cfg.trainer == "meta" else \
        BalancedBatcher(encoded, per_task=cfg.batch_per_task, **where)
    if env.master:  # say what was asked but will not happen
        for note in notes:
            print(note, file=sys.stderr)
        if book_of(cfg).aligns(cfg) and len(names) == 1:
            print(f"warning: one task ({names[0]}): the alignment loss compares tasks, so it is 0 throughout and "
                  "training is plain LoRA; give --data several tasks", file=sys.stderr)
        if fallback := generation_fallback(test_tasks, cfg.eval_mode):
            print(f"note: --eval-mode {cfg.eval_mode} scores options; {', '.join(fallback)} (no options) will be "
                  "scored by generation instead", file=sys.stderr)
    return Data(names, tok, batcher, {t: len(encoded[t]) for t in names}, test_tasks)


def evaluate_tasks(cfg, env, model, data, desc, task_ids=True):
    """The held-out tasks scored as --eval-mode says, rank r scoring examples r, r + world, ..., gathered back in
    order on every rank (no rank waits in a collective while another evaluates alone: NCCL's watchdog would kill it)."""
    ids = {t: i for i, t in enumerate(data.names)} if task_ids else None
    shard = {t: rows[env.rank::env.world] for t, rows in data.test_tasks.items() if rows[env.rank::env.world]}
    mine = evaluate(model, data.tok, shard, mode=cfg.eval_mode, max_new_tokens=cfg.eval_tokens, task_ids=ids,
                    progress=progress_bar(desc) if env.master else None, scorer=fast.choice_logprobs)
    if env.world == 1:
        return mine
    parts = [None] * env.world
    dist.all_gather_object(parts, {t: (r["mode"], r["records"]) for t, r in mine.items()})
    results = {}
    for t, rows in data.test_tasks.items():
        per_rank = [part.get(t, (None, [])) for part in parts]
        records = [per_rank[i % env.world][1][i // env.world] for i in range(len(rows))]
        results[t] = task_result(records, next(mode for mode, _ in per_rank if mode))
    return results


def build(train_py, cfg, env: Env, data: Data, overwrite=False):
    """Stage 3: base model (and its evaluation), adapter, optimizer, resume. Returns (the book's Run, before)."""
    model = fast.install(load_model(cfg.model, dtype=env.dtype, device=env.device))  # the trainer's fast forms
    n_base = sum(p.numel() for p in model.parameters())
    env.say(f"model {cfg.model}: {n_base / 1e6:.1f}M parameters, {env.dtype}, {env.device}"
            + (f", {env.world} processes" if env.world > 1 else "") + (", bf16 autocast" if env.autocast else ""))
    env.say(f"tasks ({len(data.names)}): " + ", ".join(f"{t} ({data.sizes[t]})" for t in data.names))
    if env.master:
        if overwrite:
            clear_run_state(env.out)
        write_atomic(env.out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    before = env.resumed.state.get("before") if env.resumed else None
    if data.test_tasks and before is None:
        before = without_records(evaluate_tasks(cfg, env, model, data, "eval before", task_ids=False))
        env.say("accuracy before training: " + ", ".join(f"{t} {100 * r['accuracy']:.1f}" + (" (collapsed)" if
                r["collapsed"] else "") for t, r in before.items()))

    apply_adapter_checked(model, cfg.adapter, rank=cfg.rank, alpha=cfg.alpha, heads=cfg.heads, dropout=cfg.dropout,
                          targets=[t.strip() for t in cfg.targets.split(",") if t.strip()], num_tasks=len(data.names),
                          **parse_options(cfg.adapter_options))  # the rank's memory checked first
    model.gradient_checkpointing = cfg.grad_ckpt
    if env.world > 1:  # DDP broadcasts rank 0's initial weights; dropout masks should differ between ranks
        torch.manual_seed(cfg.seed + env.rank)
    n_train = count_trainable(model)
    env.say(f"adapter {cfg.adapter}: rank {cfg.rank}, {n_train:,} trainable parameters "
            f"({100 * n_train / n_base:.3f}% of the base)")
    opt = train_py.optimizer(cfg, [p for p in model.parameters() if p.requires_grad], env.device)
    step = env.resumed.state["step"] if env.resumed else 0
    if ckpt := env.resumed:
        load_checkpoint(ckpt, model, opt, env.device, env.rank, env.world)
        data.batcher.load_state_dict(ckpt.state["batcher"])
        if env.master:
            continue_run_dir(env.out, ckpt, env.say)
        env.say(f"resumed from {ckpt.path} at step {step}")
    fwd = torch.compile(model) if cfg.compile else model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                      broadcast_buffers=False)
    return train_py.Run(model, fwd, opt, data.batcher, env.device, autocast=env.autocast, world=env.world, step=step,
                        align_fn=fast.alignment_loss), before


class Hooks:
    """Stages 4-5, what the book's loop asks of the launcher: log.jsonl and the log line (rank 0), checkpoints
    (every rank: RNG states), evaluations, the early-stop line. `stop` is the Ctrl-C flag (catch_interrupts)."""

    def __init__(self, cfg, env, data, run, before, stop):
        self.cfg, self.env, self.data, self.run, self.stop, self.on = cfg, env, data, run, stop, env.master
        self.saved_step = run.step if env.resumed else None  # the step of the last checkpoint: the last good one
        self.extra = {"config": dataclasses.asdict(cfg), "before": before, "tasks": data.names}  # state.json's rest
        self.fpt, self.peak = flops_coefficients(run.model), peak_flops(env.device)  # FLOPs per token, Σ T², logit
        self.file = open(env.out / "log.jsonl", "a" if cfg.resume else "w") if self.on else None
        self.bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", disable=not self.on, dynamic_ncols=True)

    def log(self, step):
        """The step's record: the book's numbers, then throughput, MFU, peak memory and time."""
        dt = step["seconds"]
        flops = step["tokens"] * self.fpt[0] + step["tokens_sq"] * self.fpt[1] + step["logits"] * self.fpt[2]
        rec = {k: step[k] for k in ("step", "loss", "ce", "align", "lr", "grad_norm", "tokens")}
        rec.update(tok_s=step["tokens"] / dt, mfu=flops / dt / (self.peak * self.env.world) if self.peak else None,
                   mem_mb=peak_memory_mib(self.env.device), ms=1000 * dt)
        if not self.on:
            return
        self.record(rec)
        if rec["step"] % self.cfg.log_every == 0 or rec["step"] == self.cfg.max_steps:
            mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "-"
            self.bar.write(f"step {rec['step']:5d} | loss {rec['loss']:.4f} (ce {rec['ce']:.4f}, align "
                           f"{rec['align']:.4f}) | lr {rec['lr']:.2e} | {rec['tok_s']:,.0f} tok/s | mfu {mfu} | mem "
                           f"{rec['mem_mb']:,.0f} MB | {rec['ms']:.0f} ms")
        self.bar.update(1)

    def record(self, rec):
        if self.on:
            print(json.dumps(rec), file=self.file, flush=True)

    def say(self, text):
        if self.on:
            self.bar.write(text)

    def checkpoint(self):
        env, run = self.env, self.run
        save_checkpoint(env.out / "checkpoint", run.model, run.opt, run.step, run.batcher, self.extra, env.device,
                        env.rank, env.world, run.trainable)
        self.saved_step = run.step

    def stopped(self):
        why = "interrupted" if self.stop["flag"] else "--stop-at"
        self.say(f"{why}: saved {self.env.out / 'checkpoint'} at step {self.run.step}; continue with the same command "
                 "plus --resume")

    def evaluate(self):
        if self.data.test_tasks:
            acc = accuracies(evaluate_tasks(self.cfg, self.env, self.run.model, self.data,
                                            f"eval step {self.run.step}"))
            self.say(f"eval step {self.run.step}: " + ", ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()))
            self.record({"step": self.run.step, "eval": acc})

    def not_finite(self, e):
        """The book's NotFinite error with the last good checkpoint (nothing of the failed step was written)."""
        kept = "no checkpoint was written yet" if self.saved_step is None else \
            f"the last good checkpoint is {self.env.out / 'checkpoint'} (step {self.saved_step})"
        return FloatingPointError(f"{e}; nothing of this step was saved, {kept}. Lower --lr or --align-lambda and "
                                  "--resume")

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


@contextmanager
def catch_interrupts(env):
    """Ctrl-C or SIGTERM: finish the step, save, exit 0; a second Ctrl-C aborts. Yields the flag the loop reads."""
    stop = {"flag": False}

    def on_signal(sig, frame):
        if stop.get("saved"):  # the final saves are done (finish): stop the evaluation now
            raise KeyboardInterrupt(f"interrupted after the final saves; evaluate {env.out / 'adapter'} with eval.py")
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        env.say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without saving)")
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def finish(cfg, env: Env, data: Data, hooks: Hooks):
    """Stage 6: the last checkpoint, the adapter (+ PEFT), the evaluation after training, results.json. Returns the
    result on rank 0; None elsewhere, and when a signal came during the saves (the evaluation is skipped)."""
    run, stop = hooks.run, hooks.stop
    hooks.checkpoint()
    if env.master:
        save_adapter(run.model, env.out / "adapter")
        write_atomic(env.out / "adapter" / "tasks.json", json.dumps({"tasks": data.names}))  # task ids, for MTL-LoRA
        try:
            peft = export_peft_dirs(run.model, env.out / "peft", data.names, cfg.model)
            env.say(f"saved {env.out / 'adapter'} (nanoalign) and {peft}")
        except ValueError as e:  # routers are not a plain LoRA at inference
            env.say(f"saved {env.out / 'adapter'} (nanoalign); no PEFT export: {e}")
    stop["saved"] = True
    flag = torch.tensor([float(stop["flag"])], dtype=torch.float64, device=env.device)
    if env.world > 1:  # every rank takes the same decision
        dist.all_reduce(flag)
    if flag.item():
        skipped = f"; skipped the evaluation: python eval.py --adapter-dir {env.out}" if data.test_tasks else ""
        env.say(f"interrupted: saved {env.out / 'checkpoint'} and {env.out / 'adapter'} at step {run.step} (the "
                f"last){skipped}")
        return None
    after = evaluate_tasks(cfg, env, run.model, data, "eval after") if data.test_tasks else None
    if not env.master:
        return None
    ce = [r["ce"] for r in read_log(env.out / "log.jsonl") if "ce" in r]  # a one-glance "did it learn"
    final = {"ce_first5": sum(ce[:5]) / len(ce[:5]), "ce_last5": sum(ce[-5:]) / len(ce[-5:])} if ce else {}
    result = {"config": dataclasses.asdict(cfg), "steps": run.step, "final": final}
    if after:
        write_atomic(env.out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for res in after.values()
                                                            for r in res["records"]))
        after, before = without_records(after), hooks.extra["before"]
        result.update(before=before, after=after)
        n = min(len(v) for v in data.test_tasks.values())
        print(markdown_table({"before": before, "after": after},
                             title=f"\nper-task accuracy (%), {n} test examples per task, {cfg.eval_mode}"))
        print("\n" + diagnostics_table(after, title="after training: per-task diagnostics"))
    write_atomic(env.out / "results.json", json.dumps(result, indent=2))
    return result


def train(cfg, overwrite=False, train_py=None):
    """One training run around the book's loop. Returns the result dict on rank 0; None on the others and when it
    stopped early (--stop-at, Ctrl-C: continue with cfg.resume). overwrite: train.py --overwrite."""
    train_py = train_py or book_of(cfg)
    check_config(cfg, overwrite)
    env = setup(cfg, overwrite)
    data = load_data(cfg, env)
    run, before = build(train_py, cfg, env, data, overwrite)
    with catch_interrupts(env) as stop:  # the final saves (finish) too: a signal there waits for them
        hooks = Hooks(cfg, env, data, run, before, stop)
        try:
            done = train_py.train(cfg, run, hooks)
        except train_py.NotFinite as e:
            raise hooks.not_finite(e) from None
        finally:
            hooks.close()
        return finish(cfg, env, data, hooks) if done else None


def main(argv=None, train_py=None):
    """`python train.py ...`: one run; a bad input, a full disk or an interrupt ends in one `error:` line."""
    cfg, overwrite = parse_command(argv, train_py)
    rank = int(os.environ.get("RANK", "0"))
    from safetensors import SafetensorError
    try:
        train(cfg, overwrite, train_py)
        if dist.is_initialized():
            # a gloo rank tearing down its group while rank 0 still writes can abort the process
            dist.barrier()
    except KeyboardInterrupt as e:
        print(f"\nerror: {e or 'interrupted before a checkpoint could be written'}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError, HubError, SafetensorError, torch.OutOfMemoryError) as e:
        if rank == 0:
            print(f"error: {error_line(e, '--batch-per-task or --seq-len, or add --grad-ckpt')}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # under torchrun: a peer died inside a collective (gloo: "Connection reset by peer")
        if not dist.is_initialized():
            raise
        line = (str(e).strip().splitlines() or ["the process group failed"])[0]
        line = re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]  # its first sentence, without gloo's file prefix
        print(f"error: rank {rank}: {line}; another process of the run stopped, and checkpoints are written "
              "whole: rerun with --resume", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
