"""train.py end to end on a tiny random Llama: loss falls, bitwise resume, Ctrl-C, NaN stop, 2-process DDP, errors.

The model directory is built here: a byte-level BPE tokenizer trained on the builtin tasks' text (tokenizers) and a
random 2-layer LlamaForCausalLM saved by transformers (the reference writer of the checkpoint format we read).
Each run takes a second or two of compute; subprocesses are used only where a real process is needed (SIGINT,
torchrun).
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as book  # noqa: E402  (the training step and loop)

from conftest import JSONL_TASKS, error_line, make_jsonl  # noqa: E402
import nanoalign  # noqa: E402
import nanoalign.plumbing
from nanoalign.plumbing import launch  # noqa: E402  (train.py's command line and run)
from nanoalign.plumbing.adapter_io import load_adapter  # noqa: E402
from nanoalign.data import length_groups  # noqa: E402
from nanoalign.plumbing.datasets import load_tasks  # noqa: E402
from nanoalign.evaluate import evaluate  # noqa: E402
from nanoalign.plumbing.tasks import BUILTIN_TASKS, builtin_examples  # noqa: E402

LOG_LINE = re.compile(r"^step +\d+ \| loss \S+ \(ce \S+, align \S+\) \| lr \S+ \| [\d,]+ tok/s \| mfu \S+ \| "
                      r"mem [\d,]+ MB \| \d+ ms$")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return make_jsonl(d / "train.jsonl"), make_jsonl(d / "test.jsonl", n=4, split="test")


def argv(tiny, out, data=None, *extra):
    base = ["--model", str(tiny), "--out", str(out), "--run-name", "r", "--rank", "4", "--seq-len", "96",
            "--lr", "1e-2", "--warmup", "2", "--eval-max", "0"]
    return base + (["--data", str(data)] if data else []) + [str(x) for x in extra]


def run(*args):
    return launch.train(launch.parse_args(list(args)))


def read_log(out):
    return [r for r in map(json.loads, (Path(out) / "r" / "log.jsonl").read_text().splitlines()) if "ce" in r]


def checkpoint_bytes(out):
    d = Path(out) / "r" / "checkpoint"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_twenty_steps_loss_falls_and_outputs(tiny, tmp_path, capsys):
    """20 steps of Align-LoRA on the builtin suite: the mean CE of the last 5 steps is well below that of the first
    5 (log.jsonl); every step prints the `step | loss (ce, align) | lr | tok/s | mfu | mem | ms` line; config.json,
    the nanoalign adapter, the PEFT directory, results.json and the before/after table are written."""
    res = run(*argv(tiny, tmp_path, None, "--max-steps", 20, "--max-per-task", 64, "--eval-max", 3,
                    "--eval-tokens", 3))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 21))
    first, last = sum(r["ce"] for r in log[:5]) / 5, sum(r["ce"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(r["align"] > 0 for r in log)  # the alignment loss is on (align adapter) and non-trivial
    printed = capsys.readouterr().out.splitlines()
    assert sum(bool(LOG_LINE.match(line)) for line in printed) == 20
    run_dir = tmp_path / "r"
    assert json.loads((run_dir / "config.json").read_text())["max_steps"] == 20
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    peft_cfg = json.loads((run_dir / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(results["before"]) == sorted(results["after"]) == sorted(BUILTIN_TASKS) == sorted(res["after"])
    assert any("| **average** |" in line for line in printed)


def test_resume_gives_bitwise_identical_losses(tiny, data, tmp_path):
    """10 steps straight vs 5 steps (--stop-at 5), then --resume to 10: every logged loss, CE, alignment loss and
    gradient norm is bitwise equal on CPU, and so is the final adapter (dropout on, 2 accumulation steps). The
    checkpoint holds only safetensors and JSON files."""
    common = ("--max-steps", 10, "--grad-accum", 2, "--dropout", 0.1, "--ckpt-every", 3)
    run(*argv(tiny, tmp_path / "a", data[0], *common))
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--stop-at", 5))
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4, 5]
    assert {p.suffix for p in (tmp_path / "b" / "r" / "checkpoint").iterdir()} == {".safetensors", ".json"}
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--resume"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    keys = ("step", "loss", "ce", "align", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    wa = load_file(tmp_path / "a" / "r" / "adapter" / "adapter.safetensors")
    wb = load_file(tmp_path / "b" / "r" / "adapter" / "adapter.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_checkpointing_gives_the_same_run(tiny, data, tmp_path):
    """--grad-ckpt recomputes each block in the backward (dropout masks replayed): 3 steps give the same losses and
    gradient norms as without it (one padded block per micro-batch, as checkpointing uses), up to float round-off,
    so the alignment-loss gradient survives checkpointing."""
    run(*argv(tiny, tmp_path / "a", data[0], "--max-steps", 3, "--length-groups", 1))
    run(*argv(tiny, tmp_path / "b", data[0], "--max-steps", 3, "--grad-ckpt"))
    for ra, rb in zip(read_log(tmp_path / "a"), read_log(tmp_path / "b"), strict=True):
        for k in ("ce", "align", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7)


def test_length_groups_give_the_loss_of_the_whole_micro_batch(tiny, data, tmp_path):
    """Rows run in length groups (one forward each, --length-groups 4) give the same CE, alignment loss and gradient
    norm as one padded block (--length-groups 1) when dropout is off: the CE is over all answer tokens of the
    micro-batch and the alignment loss sees all rows together."""
    common = ("--max-steps", 3, "--dropout", 0, "--batch-per-task", 3)
    run(*argv(tiny, tmp_path / "a", data[0], *common, "--length-groups", 1))
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--length-groups", 4))
    for ra, rb in zip(read_log(tmp_path / "a"), read_log(tmp_path / "b"), strict=True):
        for k in ("ce", "align", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7)


def test_length_groups_split():
    """Length-sorted rows in k equal groups, k chosen to minimise padded tokens + 16 per extra forward: uniform
    lengths stay one group, a long tail gets its own group, every row appears once."""
    assert length_groups([10] * 6) == [list(range(6))]
    groups = length_groups([40, 300, 41, 42, 290, 43], max_groups=4)
    assert sorted(i for g in groups for i in g) == list(range(6)) and len(groups) > 1
    assert {1, 4} in [set(g) for g in groups]
    assert length_groups([40, 300, 41], max_groups=1) == [[0, 1, 2]]


def test_step_forward_is_sync_free_and_equals_the_bool_mask_path():
    """micro_batch_backward calls the model with flat integer indices (`logit_indices`, computed on the host) and an
    explicit right_padded=True, the form benchmarks/train_speed.py measures (no host sync: a bool `logits_at` and an
    undecided right_padded each read device values); its losses and gradients equal those of the bool-mask call
    with padding decided from the mask, bit for bit, over several length groups."""
    from nanoalign.adapters import apply_adapter
    from nanoalign.data import BalancedBatcher
    from nanoalign.model import CausalLM, ModelConfig
    from nanoalign.plumbing.fast import install
    torch.manual_seed(0)
    model = install(CausalLM(ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)))
    apply_adapter(model, "align", rank=4, num_tasks=2)
    rows = lambda n, lo: [([1 + (7 * i + j) % 60 for j in range(lo + 5 * i)], [-100] * (lo + 5 * i - 2) + [3, 4])
                          for i in range(n)]
    batch = next(BalancedBatcher({"a": rows(3, 4), "b": rows(3, 30)}, per_task=3))
    cfg = book.TrainConfig(dropout=0.0)
    calls = []

    def recorded(ids, mask, **kw):
        calls.append(kw)
        return model(ids, mask, **kw)

    def bool_mask(ids, mask, logits_at, right_padded):  # the old call: a bool mask, padding read from the mask
        at = torch.zeros(ids.numel(), dtype=torch.bool).index_fill_(0, logits_at, True).view(ids.shape)
        return model(ids, mask, logits_at=at)

    def run_step(fwd):
        model.zero_grad(set_to_none=True)
        out = book.micro_batch_backward(fwd, model, batch, cfg, True, 2, False, torch.device("cpu"))
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (ce, la, *counts), grads = run_step(recorded)
    assert len(calls) > 1  # several length groups
    for kw in calls:
        assert kw["right_padded"] is True
        assert kw["logits_at"].dim() == 1 and kw["logits_at"].dtype == torch.long
    (ce_ref, la_ref, *counts_ref), grads_ref = run_step(bool_mask)
    assert torch.equal(ce, ce_ref) and torch.equal(la, la_ref) and counts == counts_ref and la > 0
    assert grads.keys() == grads_ref.keys() and all(torch.equal(grads[n], grads_ref[n]) for n in grads)


def test_the_launcher_trains_with_the_fast_forms(tiny, data, tmp_path, monkeypatch):
    """The Run that the launcher hands to the book's loop holds the installed fast model and the fast, sync-free
    alignment loss (the book's groups rows by task: a host sync per task on a GPU)."""
    from nanoalign.plumbing import fast
    built = []
    monkeypatch.setattr(book.Run, "__post_init__", lambda self: built.append(self) or setattr(
        self, "trainable", [p for p in self.model.parameters() if p.requires_grad]))
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 1))
    (r,) = built
    assert r.align_fn is fast.alignment_loss and type(r.model) is fast.FastCausalLM
    assert {type(m) for m in r.model.modules()} >= {fast.FastDecoder, fast.FastAttention, fast.FastMLP}


def main_error(capsys, args):
    return error_line(capsys, launch.main, args)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, data, tmp_path, capsys, monkeypatch):
    """A NaN loss (the alignment loss made NaN on resume) stops with exit code 1 and one line naming the step and
    the last good checkpoint; the checkpoint from before is byte-for-byte intact and still resumes; no record is
    logged for the failed step."""
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 6, "--stop-at", 3))
    saved = checkpoint_bytes(tmp_path)
    real = book.alignment_objective

    def nan_align(*args):
        ce, la = real(*args)
        return ce, la * float("nan")
    monkeypatch.setattr(book, "alignment_objective", nan_align)
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--max-steps", 6, "--resume"))
    assert error.startswith("error: loss is nan at step 4 ") and "last good checkpoint" in error
    assert f"{tmp_path / 'r' / 'checkpoint'} (step 3)" in error
    assert checkpoint_bytes(tmp_path) == saved
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    monkeypatch.setattr(book, "alignment_objective", real)
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 6, "--resume"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_non_finite_weights_after_an_update_are_never_checkpointed(tiny, data, tmp_path, capsys, monkeypatch):
    """An update that leaves a weight inf (AdamW made to write one at step 3, with finite loss and gradient) stops
    the run before step 3's checkpoint: one error line naming step 3 and the step-2 checkpoint, which is on disk,
    finite, and resumes to the end."""
    real = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--max-steps", 5, "--ckpt-every", 1))
    assert error.startswith("error: the update made adapter weights non-finite at step 3 ")
    assert f"the last good checkpoint is {tmp_path / 'r' / 'checkpoint'} (step 2)" in error
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "r" / "checkpoint.tmp").exists()
    weights = load_file(tmp_path / "r" / "checkpoint" / "adapter.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 5, "--ckpt-every", 1, "--resume"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "error: --lr must be a finite number, got inf"),
    (["--lr", "1e6"], "error: --lr must be in (0, 1], got 1000000.0"),
    (["--grad-clip", "nan"], "error: --grad-clip must be a finite number, got nan"),
    (["--align-lambda", "nan"], "error: --align-lambda must be a finite number, got nan"),
    (["--align-lambda", "-0.1"], "error: --align-lambda must not be negative"),
    (["--weight-decay", "inf"], "error: --weight-decay must be a finite number"),
    (["--dropout", "1"], "error: --dropout must be in [0, 1)"),
    (["--alpha", "0"], "error: --alpha must be in (0, 1e+06]"),
    (["--alpha", "1e308"], "error: --alpha must be in (0, 1e+06]"),
    (["--lr", "0"], "error: --lr must be in (0, 1]"),
])
def test_numeric_flags_out_of_range_are_refused_before_anything_is_written(tiny, data, tmp_path, capsys, extra,
                                                                          message):
    """Non-finite or out-of-range numbers (which used to produce a NaN or a huge-weight checkpoint after the first
    update) end with one error line naming the flag, before the run directory is even created."""
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--ckpt-every", 1, *extra))
    assert error.startswith(message), error
    assert not (tmp_path / "r").exists()


def test_forgetting_resume_destroys_nothing_and_overwrite_starts_fresh(tiny, data, tmp_path, capsys):
    """A fresh start in a run directory holding a checkpoint and a log is refused with one line (checkpoint and log
    byte-for-byte unchanged); --overwrite starts fresh (the old log is gone, the new one counts from step 1, the
    checkpoint is the new run's); --resume together with --overwrite is refused."""
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 6, "--stop-at", 3))
    saved, log = checkpoint_bytes(tmp_path), (tmp_path / "r" / "log.jsonl").read_bytes()
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--max-steps", 6, "--stop-at", 2))
    assert "holds an earlier run (checkpoint, log.jsonl): pass --resume to continue it, or --overwrite" in error
    assert checkpoint_bytes(tmp_path) == saved and (tmp_path / "r" / "log.jsonl").read_bytes() == log
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--resume", "--overwrite"))
    assert "pass one of them" in error
    (tmp_path / "r" / "checkpoint").rename(tmp_path / "r" / "checkpoint.old")  # a crash between the renames
    assert "holds an earlier run (checkpoint.old, log.jsonl)" in main_error(capsys, argv(tiny, tmp_path, data[0]))
    launch.main(argv(tiny, tmp_path, data[0], "--max-steps", 6, "--stop-at", 2, "--overwrite"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "r" / "checkpoint.old").exists()


def test_resume_drops_a_torn_last_log_line_and_refuses_a_damaged_one(tiny, data, tmp_path, capsys):
    """A log whose last line was cut short (a full disk, a power loss) resumes with a note, the torn line dropped,
    and gives the same records as a run never interrupted; a damaged line before the last is one error line naming
    the file and line."""
    common = ("--max-steps", 5, "--dropout", 0)
    run(*argv(tiny, tmp_path / "a", data[0], *common))
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--stop-at", 3))
    log = tmp_path / "b" / "r" / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 4, "loss": 3.1')
    capsys.readouterr()
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--resume"))
    assert f"note: {log}:4: dropped a torn last line" in capsys.readouterr().out
    keys = ("step", "loss", "ce", "align", "grad_norm")
    assert [[r[k] for k in keys] for r in read_log(tmp_path / "a")] == [[r[k] for k in keys]
                                                                       for r in read_log(tmp_path / "b")]
    run(*argv(tiny, tmp_path / "c", data[0], *common, "--stop-at", 3))
    log = tmp_path / "c" / "r" / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "\x00\x00garbage", *lines[1:]]) + "\n")
    error = main_error(capsys, argv(tiny, tmp_path / "c", data[0], *common, "--resume"))
    assert error.startswith(f"error: {log}:2: not a JSON record")


@pytest.mark.parametrize("victim", ["adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
                                    "adapter_config.json"])
def test_a_damaged_checkpoint_is_named_in_one_line(tiny, data, tmp_path, capsys, victim):
    """Resuming from a checkpoint with one file damaged (garbage bytes) and no checkpoint.old: one error line naming
    that file, no traceback."""
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 4, "--stop-at", 2))
    bad = tmp_path / "r" / "checkpoint" / victim
    bad.write_bytes(b"\x00garbage")
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--max-steps", 4, "--resume"))
    assert error.startswith("error: cannot resume: ") and str(bad) in error and "--overwrite" in error


def test_a_damaged_live_checkpoint_falls_back_to_checkpoint_old(tiny, data, tmp_path, capsys):
    """A damaged live checkpoint (truncated adapter.safetensors) with a complete checkpoint.old from step 1: resume
    says so, continues from step 1 (later log records dropped), moves the damaged one to checkpoint.bad, and ends
    with the adapter of a run never interrupted, bit for bit."""
    common = ("--max-steps", 4, "--dropout", 0.1)
    run(*argv(tiny, tmp_path / "a", data[0], *common))
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--stop-at", 1))
    run_dir = tmp_path / "b" / "r"
    shutil.copytree(run_dir / "checkpoint", tmp_path / "step1")
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--stop-at", 2, "--resume"))
    shutil.copytree(tmp_path / "step1", run_dir / "checkpoint.old")
    st = run_dir / "checkpoint" / "adapter.safetensors"
    damaged = st.read_bytes()[:100]
    st.write_bytes(damaged)
    capsys.readouterr()
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--resume"))
    out = capsys.readouterr().out
    assert f"note: {st}: corrupt or truncated safetensors file" in out and "resuming from" in out
    assert f"resumed from {run_dir / 'checkpoint.old'} at step 1" in out
    assert (run_dir / "checkpoint.bad" / "adapter.safetensors").read_bytes() == damaged
    assert not (run_dir / "checkpoint.old").exists()
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4]
    wa = load_file(tmp_path / "a" / "r" / "adapter" / "adapter.safetensors")
    wb = load_file(run_dir / "adapter" / "adapter.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_full_disk_during_a_checkpoint_leaves_the_last_one_and_no_tmp(tiny, data, tmp_path, capsys, monkeypatch):
    """ENOSPC while the step-2 checkpoint is written (safetensors' writer made to fail after writing some bytes):
    one error line naming the file and saying the disk is full, no checkpoint.tmp left behind, the step-1
    checkpoint intact; after freeing space, --resume continues from step 1."""
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def full(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) > 3 and path.endswith("optimizer.safetensors"):
            Path(path).write_bytes(b"\x00" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    error = main_error(capsys, argv(tiny, tmp_path, data[0], "--max-steps", 4, "--ckpt-every", 1))
    tmp = tmp_path / "r" / "checkpoint.tmp"
    assert error == f"error: {tmp / 'optimizer.safetensors'}: the disk is full; free space and run again (train.py: " \
                    "--resume continues from the last checkpoint)"
    assert not tmp.exists()
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 1
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 4, "--ckpt-every", 1, "--resume"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]


def test_an_unwritable_out_is_one_line(tiny, data, tmp_path, capsys, monkeypatch):
    """--out on a read-only file system (mkdir made to fail with EROFS: root ignores permission bits) and --out
    under a file: one error line naming the path and what to do."""
    real = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", read_only)
    error = main_error(capsys, argv(tiny, tmp_path / "ro", data[0], "--max-steps", 1))
    assert error == f"error: {tmp_path / 'ro' / 'r'}: read-only file system; choose another --out"
    error = main_error(capsys, argv(tiny, data[0], data[0], "--max-steps", 1))
    assert error == f"error: {data[0] / 'r'}: a part of the path is a file, not a directory"


def test_one_task_warns_that_the_alignment_loss_is_zero(tiny, tmp_path, capsys):
    """Align-LoRA on a single task: one warning line at startup (the alignment loss compares tasks), and the logged
    alignment loss is indeed 0; LoRA without --align-any gets no warning."""
    one = make_jsonl(tmp_path / "one.jsonl", tasks=JSONL_TASKS[:1])
    run(*argv(tiny, tmp_path / "a", one, "--max-steps", 2))
    err = capsys.readouterr().err
    assert sum(line.startswith("warning: one task") for line in err.splitlines()) == 1, err
    assert [r["align"] for r in read_log(tmp_path / "a")] == [0.0, 0.0]
    run(*argv(tiny, tmp_path / "b", one, "--max-steps", 1, "--adapter", "lora"))
    assert "warning" not in capsys.readouterr().err


def test_eval_mode_loglik_names_the_tasks_it_generates_for(tiny, data, tmp_path, capsys):
    """--eval-mode loglik with a held-out task whose examples have no options: one note names that task (it is
    scored by generation, and its result says so)."""
    rows = [json.loads(line) for line in data[1].read_text().splitlines()]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "options" or r["task"] != JSONL_TASKS[1]})
                            + "\n" for r in rows))
    res = run(*argv(tiny, tmp_path, data[0], "--max-steps", 1, "--eval-max", 2, "--eval-data", test, "--eval-mode",
                    "loglik", "--eval-tokens", 2))
    notes = [line for line in capsys.readouterr().err.splitlines() if "scored by generation" in line]
    assert notes == [f"note: --eval-mode loglik scores options; {JSONL_TASKS[1]} (no options) will be scored by "
                     "generation instead"]
    assert {t: r["mode"] for t, r in res["after"].items()} == {JSONL_TASKS[0]: "loglik", JSONL_TASKS[1]: "generate",
                                                                JSONL_TASKS[2]: "loglik"}


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny, data, tmp_path):
    """SIGINT to a running `python train.py` after its first log lines: exit code 0, a checkpoint at the last
    finished step, and `--resume` continues from exactly that step."""
    cmd = [sys.executable, "-u", str(ROOT / "train.py"), *argv(tiny, tmp_path, data[0], "--max-steps", 100000,
                                                              "--ckpt-every", 100000)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if sum(line.startswith("step") for line in lines) == 3:
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode == 0, err
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    steps = [r["step"] for r in read_log(tmp_path)]
    assert state["step"] == steps[-1] >= 3
    assert f"interrupted: saved" in rest and "Traceback" not in err
    n = state["step"]
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 100000, "--ckpt-every", 100000, "--resume",
              "--stop-at", n + 2))
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, n + 3))


def test_ddp_two_processes_gloo(tiny, data, tmp_path):
    """`torchrun --nproc_per_node 2 train.py` on CPU (gloo): finishes, logs every step once, and the checkpoint shows
    the global data stream (each task advanced by batch_per_task x 2 ranks x steps examples) and one RNG state per
    rank, different between the ranks (different dropout masks). The evaluations (before, at step 2, after) are
    shared out over both ranks and gathered: the after-training records are those of a one-process evaluation of
    the saved adapter, example by example, in the same order."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"),
           *argv(tiny, tmp_path, data[0], "--max-steps", 4, "--batch-per-task", 1, "--device", "cpu", "--eval-max",
                 3, "--eval-data", data[1], "--eval-mode", "loglik", "--eval-every", 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes" in p.stdout and p.stdout.count("| loss ") == 4
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["ce"] == r["ce"] for r in log)
    state = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert state["world_size"] == 2 and state["batcher"]["pos"] == [1 * 2 * 4] * 3
    rng = load_file(tmp_path / "r" / "checkpoint" / "rng.safetensors")
    assert sorted(rng) == ["rank0", "rank1"] and not torch.equal(rng["rank0"], rng["rank1"])
    assert (tmp_path / "r" / "adapter" / "adapter.safetensors").is_file()
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert all(r["n"] == 3 for when in ("before", "after") for r in results[when].values())
    evals = [r for r in map(json.loads, (tmp_path / "r" / "log.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evals] == [2] and sorted(evals[0]["eval"]) == list(JSONL_TASKS)
    model = nanoalign.plumbing.load_model(tiny)
    load_adapter(model, tmp_path / "r" / "adapter")
    tasks = load_tasks(str(data[1]), "test", max_per_task=3, seed=0)
    alone = evaluate(model, nanoalign.plumbing.load_tokenizer(tiny), tasks, mode="loglik",
                     task_ids={t: i for i, t in enumerate(JSONL_TASKS)})
    shared = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    expected = [r for res in alone.values() for r in res["records"]]
    assert [(r["task"], r["index"], r["pred"]) for r in shared] == [(r["task"], r["index"], r["pred"])
                                                                    for r in expected]
    assert [x for r in shared for x in r["scores"]] == pytest.approx([x for r in expected for x in r["scores"]],
                                                                     rel=1e-5)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank-1 process through /proc")
def test_ddp_peer_killed_ends_in_one_line(tiny, data, tmp_path):
    """kill -9 of rank 1 under torchrun: rank 0, waiting in a collective, says so in one `error:` line (gloo's
    "Connection reset by peer" without its traceback), and the checkpoint it left is whole."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *argv(tiny, tmp_path, data[0], "--max-steps", 400, "--batch-per-task", 1,
                                         "--device", "cpu", "--ckpt-every", 2)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = tmp_path / "r" / "checkpoint" / "state.json"
    deadline = time.time() + 180
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    rank1 = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and rank_of(d, tmp_path) == "1"]
    assert state.exists() and len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("error: rank 0:")]
    assert len(ours) == 1 and "rerun with --resume" in ours[0], err[-3000:]
    assert "plumbing/launch.py\", line" not in err and "train.py\", line" not in err  # no traceback of ours
    assert json.loads(state.read_text())["step"] >= 2


def rank_of(proc_dir, out):
    """RANK of a process training into `out` (None for any other process)."""
    try:
        env = dict(kv.split("=", 1) for kv in (proc_dir / "environ").read_text().split("\0") if "=" in kv)
        cmd = (proc_dir / "cmdline").read_text()
    except OSError:
        return None
    return env.get("RANK") if str(out) in cmd and "train.py" in cmd else None


@pytest.mark.parametrize("kind", ["lora", "hydra", "hydra-norouter", "rlora", "mlora", "mtl", "multilora"])
def test_every_adapter_trains_and_evaluates(tiny, data, tmp_path, kind):
    """Each adapter kind goes through the same loop (2 steps, finite losses), is saved, exported to PEFT when it is
    a plain LoRA at inference (not for routers; MTL-LoRA as one PEFT LoRA per task, peft/<task>), and evaluated
    (MTL-LoRA with its task ids)."""
    res = run(*argv(tiny, tmp_path, data[0], "--adapter", kind, "--max-steps", 2, "--eval-max", 2,
                    "--eval-data", data[1], "--eval-tokens", 2, "--heads", 2))
    log = read_log(tmp_path)
    assert len(log) == 2 and all(r["ce"] == r["ce"] and r["align"] == 0 for r in log)
    assert (tmp_path / "r" / "peft").exists() == (kind not in ("hydra", "rlora"))
    per_task = sorted(p.parent.name for p in (tmp_path / "r" / "peft").glob("*/adapter_config.json"))
    assert per_task == (sorted(JSONL_TASKS) if kind == "mtl" else [])
    assert sorted(res["after"]) == list(JSONL_TASKS)


def test_per_task_peft_export_keeps_task_names_inside_the_run(tmp_path):
    """MTL-LoRA's per-task PEFT directories are named after the tasks, except a name that is not a plain file name
    (a task name comes from a data file): that one becomes task<id>, inside peft/, and holds that task id's ΔW_t."""
    from nanoalign.adapters import apply_adapter
    from nanoalign.plumbing.adapter_io import export_peft_dirs
    from nanoalign.model import CausalLM, ModelConfig
    from safetensors.torch import load_file
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
    model = apply_adapter(CausalLM(cfg), "mtl", rank=2, num_tasks=2, targets=["q_proj"])
    with torch.no_grad():  # every adapter tensor away from its init (B = 0, equal task mixes), so ΔW_t differ
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    text = export_peft_dirs(model, tmp_path / "peft", ["good-task_1", "../../evil"])
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["good-task_1", "task1"], text
    assert not (tmp_path.parent / "evil").exists()
    a, b = (load_file(tmp_path / "peft" / d / "adapter_model.safetensors") for d in ("good-task_1", "task1"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_adapter_options_reach_the_adapter_and_the_saved_config(tiny, data, tmp_path):
    """--adapter-options key=value pairs (JSON scalars, true/false) go to the adapter class and into the saved
    adapter config, so load_adapter rebuilds the same variant: here R-LoRA without its random init (tutorial 08)."""
    assert launch.parse_options(" random_init=False, gamma=16,head_reduction=mean ,") == {
        "random_init": False, "gamma": 16, "head_reduction": "mean"}
    run(*argv(tiny, tmp_path, data[0], "--adapter", "rlora", "--max-steps", 1, "--heads", 2,
              "--adapter-options", "random_init=false,multi_head_dropout=false"))
    saved = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert saved["options"] == {"random_init": False, "multi_head_dropout": False}
    tensors = load_file(tmp_path / "r" / "adapter" / "adapter.safetensors")
    comp = [v for k, v in tensors.items() if k.endswith("comp_B")]
    assert comp and all(v.abs().max() == 0 for v in comp)  # no random init: no compensation
    with pytest.raises(ValueError, match="--adapter-options"):  # resuming as another variant is refused
        run(*argv(tiny, tmp_path, data[0], "--adapter", "rlora", "--max-steps", 2, "--heads", 2, "--resume",
                  "--adapter-options", "random_init=false"))
    run(*argv(tiny, tmp_path, data[0], "--adapter", "rlora", "--max-steps", 2, "--heads", 2, "--resume",
              "--adapter-options", "random_init=False, multi_head_dropout=FALSE"))  # the same options, spelt otherwise
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


@pytest.mark.parametrize("case, extra, message", [
    ("unknown model", ["--model", "no-such-model"], "error: unknown model 'no-such-model'"),
    ("missing model dir", ["--model", "/no/such/dir"], "error: no such model directory: /no/such/dir"),
    ("unknown task", ["--data", f"{BUILTIN_TASKS[0]},no-such-task"], "error: unknown task no-such-task"),
    ("unknown subset task", ["--tasks", "no-such-task"], "error: --tasks no-such-task: not among the tasks"),
    ("malformed row", ["--data", "BAD"], "bad.jsonl:2: missing key 'answer'"),
    ("no checkpoint", ["--resume"], "no checkpoint to resume from"),
    ("bad number", ["--batch-per-task", "0"], "error: --batch-per-task must be at least 1"),
    ("unknown option", ["--adapter", "lora", "--adapter-options", "gamma=3"], "error: adapter 'lora' has no option"),
    ("option typo", ["--adapter", "rlora", "--adapter-options", "random_init=flase"],
     "error: adapter option random_init must be a bool"),
    ("option syntax", ["--adapter", "rlora", "--adapter-options", "random_init"], "takes key=value pairs"),
    ("unknown device", ["--device", "tpu"], "error: --device tpu: not a device nanoalign runs on; use auto, cpu"),
    ("no such device type", ["--device", "meta"], "error: --device meta: not a device nanoalign runs on"),
    ("CUDA absent", ["--device", "cuda"], "error: --device cuda: CUDA is not available here; use --device cpu"),
    ("non-UTF-8 data", ["--data", "LATIN1"], "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column"),
])
def test_bad_inputs_give_one_line_errors(tiny, data, tmp_path, capsys, monkeypatch, case, extra, message):
    """Bad inputs end with exit code 1 and a single `error: ...` line on stderr naming the problem, no traceback
    (CUDA is made absent, as on the CPU machines where the tests run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(builtin_examples(JSONL_TASKS[0], "train", n=1)[0]) + "\n"
                   + json.dumps({"task": JSONL_TASKS[0], "prompt": "Q?\nAnswer:"}) + "\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(bad.read_bytes().split(b"\n")[0] + b"\n"
                       + json.dumps({"task": "t", "prompt": "caf\u00e9\nAnswer:", "answer": " y"},
                                    ensure_ascii=False).encode("latin-1") + b"\n")
    files = {"BAD": str(bad), "LATIN1": str(latin1)}
    assert message in main_error(capsys, argv(tiny, tmp_path, data[0]) + [files.get(x, x) for x in extra])


# ----------------------------------------------------------------------------------------------------------------
# --trainer meta (MeTA-LoRA, nanoalign/meta.py; its algorithm is pinned in tests/test_meta.py)

META = ("--trainer", "meta", "--meta-support", 2, "--meta-query", 2, "--meta-tasks", 2)


def test_meta_trainer_runs_exports_peft_and_resumes_bitwise(tiny, data, tmp_path):
    """--trainer meta --shots 8 (the default adapter becomes a plain LoRA): 6 steps straight vs 3 (--stop-at) then
    --resume give bitwise-equal losses and adapters; the run saves a PEFT LoRA; the query loss falls."""
    common = (*META, "--shots", 8, "--max-steps", 6, "--ckpt-every", 2)
    run(*argv(tiny, tmp_path / "a", data[0], *common))
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--stop-at", 3))
    run(*argv(tiny, tmp_path / "b", data[0], *common, "--resume"))
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 6
    cfg = json.loads((tmp_path / "a" / "r" / "config.json").read_text())
    assert cfg["adapter"] == "lora" and cfg["trainer"] == "meta"
    assert json.loads((tmp_path / "a" / "r" / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (tmp_path / "a" / "r" / "adapter" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "b" / "r" / "adapter" / "adapter.safetensors").read_bytes()


def test_shots_limit_both_trainers_to_the_same_examples(tiny, data, tmp_path, capsys):
    """--shots K keeps K examples of every task, the same ones for the standard and the meta trainer."""
    run(*argv(tiny, tmp_path / "s", data[0], "--shots", 5, "--max-steps", 1, "--adapter", "lora"))
    run(*argv(tiny, tmp_path / "m", data[0], *META, "--shots", 5, "--max-steps", 1))
    out = capsys.readouterr().out
    assert out.count(", ".join(f"{t} (5)" for t in sorted(JSONL_TASKS))) == 2


@pytest.mark.parametrize("extra, message", [
    ((*META, "--adapter", "align"), "--trainer meta trains a plain LoRA without an alignment loss"),
    ((*META, "--grad-ckpt"), "drop --grad-ckpt and --compile"),
    ((*META, "--meta-inner-lr", "nan"), "--meta-inner-lr must be a finite number"),
    (("--trainer", "meta", "--shots", 6), "MeTA-LoRA needs --meta-support + --meta-query = 8 examples"),
    (("--shots", -1), "--shots must not be negative"),
])
def test_meta_bad_options_are_one_line(tiny, data, tmp_path, capsys, extra, message):
    """Options MeTA-LoRA cannot honour are refused with one line naming the flag."""
    assert message in error_line(capsys, launch.main, argv(tiny, tmp_path, data[0], "--max-steps", 2, *extra))
