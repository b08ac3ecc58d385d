"""train.py end to end on a tiny random Llama: loss falls, bitwise resume, Ctrl-C, NaN stop, 2-process DDP, errors.

The model directory is built here: a byte-level BPE tokenizer trained on the builtin tasks' text (tokenizers) and a
random 2-layer LlamaForCausalLM saved by transformers (the reference writer of the checkpoint format we read).
Each run takes a second or two of compute; subprocesses are used only where a real process is needed (SIGINT,
torchrun).
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as train_py  # noqa: E402

from conftest import JSONL_TASKS, make_jsonl  # noqa: E402
from nanoalign.tasks import BUILTIN_TASKS, builtin_examples  # noqa: E402

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
    return train_py.train(train_py.parse_args(list(args)))


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
    assert train_py.length_groups([10] * 6) == [list(range(6))]
    groups = train_py.length_groups([40, 300, 41, 42, 290, 43], max_groups=4)
    assert sorted(i for g in groups for i in g) == list(range(6)) and len(groups) > 1
    assert {1, 4} in [set(g) for g in groups]
    assert train_py.length_groups([40, 300, 41], max_groups=1) == [[0, 1, 2]]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, data, tmp_path, capsys):
    """A NaN loss (--align-lambda nan on resume) stops with exit code 1 and one line naming the step; the optimizer
    step is not taken, the checkpoint from before is byte-for-byte intact and still resumes; no record is logged
    for the failed step."""
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 6, "--stop-at", 3))
    saved = checkpoint_bytes(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_py.main(argv(tiny, tmp_path, data[0], "--max-steps", 6, "--resume", "--align-lambda", "nan"))
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: loss is nan at step 4 ") and "Traceback" not in err
    assert checkpoint_bytes(tmp_path) == saved
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    run(*argv(tiny, tmp_path, data[0], "--max-steps", 6, "--resume"))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]


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
    rank, different between the ranks (different dropout masks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"),
           *argv(tiny, tmp_path, data[0], "--max-steps", 4, "--batch-per-task", 1, "--device", "cpu")]
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


@pytest.mark.parametrize("kind", ["lora", "hydra", "hydra-norouter", "rlora", "mlora", "mtl", "multilora"])
def test_every_adapter_trains_and_evaluates(tiny, data, tmp_path, kind):
    """Each adapter kind goes through the same loop (2 steps, finite losses), is saved, exported to PEFT when it is
    a plain LoRA at inference (not for routers or per-task adapters), and evaluated (MTL-LoRA with its task ids)."""
    res = run(*argv(tiny, tmp_path, data[0], "--adapter", kind, "--max-steps", 2, "--eval-max", 2,
                    "--eval-data", data[1], "--eval-tokens", 2, "--heads", 2))
    log = read_log(tmp_path)
    assert len(log) == 2 and all(r["ce"] == r["ce"] and r["align"] == 0 for r in log)
    assert (tmp_path / "r" / "peft").exists() == (kind not in ("hydra", "rlora", "mtl"))
    assert sorted(res["after"]) == list(JSONL_TASKS)


def test_adapter_options_reach_the_adapter_and_the_saved_config(tiny, data, tmp_path):
    """--adapter-options key=value pairs (JSON scalars, true/false) go to the adapter class and into the saved
    adapter config, so load_adapter rebuilds the same variant: here R-LoRA without its random init (tutorial 08)."""
    assert train_py.parse_options(" random_init=False, gamma=16,head_reduction=mean ,") == {
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
])
def test_bad_inputs_give_one_line_errors(tiny, data, tmp_path, capsys, case, extra, message):
    """Bad inputs end with exit code 1 and a single `error: ...` line on stderr naming the problem, no traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(builtin_examples(JSONL_TASKS[0], "train", n=1)[0]) + "\n"
                   + json.dumps({"task": JSONL_TASKS[0], "prompt": "Q?\nAnswer:"}) + "\n")
    args = argv(tiny, tmp_path, data[0]) + [str(bad) if x == "BAD" else x for x in extra]
    with pytest.raises(SystemExit) as e:
        train_py.main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
