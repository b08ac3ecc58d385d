"""train.py's numerics pinned: short runs on the tiny random Llama give bitwise the loss curves, gradient norms, final
adapter tensors and before/after accuracies recorded from the code at commit 9c9a005 (before train() was split into
stages), so a refactor of the loop cannot change what a run computes (on CPU, one thread; one record per kind of
CPU, since AVX-512 kernels round differently from AVX2, and an Intel AVX-512 + AMX box differently from an AMD
AVX-512 one: each later record was added with `--add` from code that matched an earlier record bitwise).

The record is tests/train_pin.json, written by `python tests/test_train_pin.py` (run it only to re-pin after a change
of numerics that is meant, and say so in the commit). It holds a fingerprint of its inputs (the tiny model's weights
and tokenizer, built by conftest.make_tiny_model with the installed transformers/tokenizers, and its config without
the version stamp): where the fixture comes out different (other library versions), the test is skipped rather than
compared against other inputs.
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from nanoalign.plumbing import launch  # noqa: E402  (what `python train.py` runs)

from conftest import make_jsonl, make_tiny_model  # noqa: E402

PIN = HERE / "train_pin.json"
CASES = {  # flags after the common ones; together they touch every branch of the step
    "align-accum-dropout-groups": ["--max-steps", 6, "--grad-accum", 2, "--batch-per-task", 2, "--dropout", 0.1,
                                   "--ckpt-every", 3],
    "lora-align-any-mmd-ckpt-clip-wd": ["--adapter", "lora", "--align-any", "--align-loss", "mmd", "--grad-ckpt",
                                        "--max-steps", 5, "--grad-clip", 0.5, "--weight-decay", 0.01],
    "hydra-answer-tokens-eval": ["--adapter", "hydra", "--heads", 2, "--align-any", "--align-tokens", "answer",
                                 "--max-steps", 4, "--eval-max", 2, "--eval-every", 2, "--eval-tokens", 2,
                                 "--eval-data", "TEST"],
    "align-position-wise-loglik-eval": ["--align-position-wise", "--batch-per-task", 2, "--max-steps", 4, "--warmup",
                                        3, "--eval-max", 3, "--eval-mode", "loglik", "--eval-data", "TEST"],
}
KEYS = ("step", "loss", "ce", "align", "lr", "grad_norm", "tokens")


def fingerprint(tiny):
    """The tiny model's tokenizer, weights and config, but not the config's "transformers_version" stamp: a new
    transformers release that builds the same model must not turn the pin into a skip (5.24.0 -> 5.25.0 did)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "model.safetensors"):
        h.update((Path(tiny) / name).read_bytes())
    config = json.loads((Path(tiny) / "config.json").read_text())
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()


def cpu_kind():
    """The CPU as far as its float rounding goes: torch's kernel capability, the vendor, and AMX (oneDNN takes other
    paths with it). An Intel AVX-512 + AMX box rounds a gradient norm 1 ulp away from an AMD AVX-512 one."""
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return cap
    vendor = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("vendor_id")), "")
    return " ".join(x for x in (cap, vendor, "amx" * (" amx_bf16" in info)) if x)


def recorded_cases(pin):
    """The record for this CPU: its own (by_cpu), else its capability's (by_capability; the AVX-512 one is an AMD
    EPYC's), else the original AVX2 record (cases), or None."""
    cap, kind = torch.backends.cpu.get_cpu_capability(), cpu_kind()
    if kind in pin.get("by_cpu", {}):
        return pin["by_cpu"][kind]
    return pin["cases"] if cap == pin.get("cpu_capability", "AVX2") else pin.get("by_capability", {}).get(cap)


def exact(x):
    """A float as its exact hex spelling (JSON keeps it bitwise), other values as they are."""
    return x.hex() if isinstance(x, float) else x


def pinned_run(tiny, train_data, test_data, out, flags):
    """One run of `launch.train` -> what is pinned: every step's record (floats in hex), a hash of the final adapter
    tensors, the per-task accuracies before and after (when evaluated)."""
    torch.set_num_threads(1)
    argv = ["--model", str(tiny), "--out", str(out), "--run-name", "r", "--rank", "4", "--seq-len", "96", "--lr",
            "1e-2", "--warmup", "2", "--eval-max", "0", "--data", str(train_data)]
    argv += [str(test_data) if f == "TEST" else str(f) for f in flags]
    result = launch.train(launch.parse_args(argv))
    log = [json.loads(line) for line in (Path(out) / "r" / "log.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file
    tensors = load_file(Path(out) / "r" / "adapter" / "adapter.safetensors")
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].numpy().tobytes())
    acc = {when: {t: exact(r["accuracy"]) for t, r in result[when].items()}
           for when in ("before", "after") if when in result}
    return {"steps": [[exact(r[k]) for k in KEYS] for r in log if "ce" in r],
            "evals": [{"step": r["step"], "eval": {t: exact(a) for t, a in r["eval"].items()}}
                      for r in log if "eval" in r],
            "adapter_sha256": h.hexdigest(), "accuracy": acc}


@pytest.fixture(scope="module")
def pin():
    return json.loads(PIN.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_short_runs_are_bitwise_the_recorded_ones(tiny, tmp_path, pin, case, one_thread):
    """Every logged loss, CE, alignment loss, learning rate and gradient norm, the token counts, the mid-run
    evaluations, the final adapter's tensors and the before/after accuracies equal the record of 9c9a005 bit for
    bit (skipped when the tiny model itself differs from the recorded one, i.e. other library versions)."""
    if fingerprint(tiny) != pin["inputs"]:
        pytest.skip("the tiny model built here differs from the pinned one (other transformers/tokenizers)")
    train_data = make_jsonl(tmp_path / "train.jsonl")
    test_data = make_jsonl(tmp_path / "test.jsonl", n=4, split="test")
    got = pinned_run(tiny, train_data, test_data, tmp_path / "out", CASES[case])
    # CPU kernels of another ISA (AVX-512 vs AVX2) or vendor round differently, so each has its record of the same code
    cases = recorded_cases(pin)
    if cases is None:
        pytest.skip(f"no record for this CPU ({cpu_kind()}): pin it with `python tests/test_train_pin.py --add`")
    want = cases[case]
    assert got["steps"] == want["steps"]
    assert got["evals"] == want["evals"] and got["accuracy"] == want["accuracy"]
    assert got["adapter_sha256"] == want["adapter_sha256"]


if __name__ == "__main__":  # re-pin: python tests/test_train_pin.py [--add]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        tiny = make_tiny_model(d / "tiny")
        train_data, test_data = make_jsonl(d / "train.jsonl"), make_jsonl(d / "test.jsonl", n=4, split="test")
        cases = {case: pinned_run(tiny, train_data, test_data, d / case, flags) for case, flags in CASES.items()}
        inputs = fingerprint(tiny)
    cap = torch.backends.cpu.get_cpu_capability()
    if "--add" in sys.argv:  # keep the record and add this CPU's (only for code that passes the record elsewhere)
        record = json.loads(PIN.read_text())
        assert record["inputs"] == inputs, "the tiny model differs from the recorded one: re-pin from scratch"
        record.setdefault("by_cpu", {})[cpu_kind()] = cases
    else:
        record = {"inputs": inputs, "cpu_capability": cap, "cases": cases}
    PIN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {PIN}")
