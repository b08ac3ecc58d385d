"""Adapter files and PEFT export (nanoalign/plumbing/adapter_io.py): save/load round trips and their errors, and
exported PEFT LoRA directories against `peft` itself."""

import json

import pytest
import torch

from nanoalign.adapters import apply_adapter
from nanoalign.model import CausalLM, ModelConfig
from nanoalign.plumbing.adapter_io import export_peft, load_adapter, save_adapter
from test_adapters import CFG, MLP, batch, logits, randomize, tiny


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("kind", ["lora", "hydra", "rlora", "mlora", "mtl", "multilora"])
def test_save_load_round_trip(kind, tmp_path):
    """save_adapter + load_adapter on a fresh copy of the base model reproduces the logits exactly — for R-LoRA
    and M-LoRA too, whose init compensation travels with the adapter (the fresh model draws another random init)."""
    ids, tids = batch()
    model = randomize(apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP + ("o_proj",), num_tasks=2,
                                    dropout=0.1), std=0.2)
    before = logits(model, ids, tids)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = tiny()
    torch.manual_seed(123)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids, tids), before)
    assert fresh.adapter_config == json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    load_adapter(fresh, tmp_path / "a")  # into a model that already has the same adapter: fine


def test_load_errors(tmp_path):
    """Loading into another base shape, into another adapter kind, or from a non-adapter directory is a clear error."""
    save_adapter(apply_adapter(tiny(), "lora", rank=4, targets=MLP), tmp_path / "a")
    other = ModelConfig(**{**CFG.__dict__, "intermediate_size": 64})
    with pytest.raises(ValueError, match="trained on a base where"):
        load_adapter(tiny(cfg=other), tmp_path / "a")
    with pytest.raises(ValueError, match="kind='lora'"):
        load_adapter(apply_adapter(tiny(), "hydra", rank=4, targets=MLP), tmp_path / "a")
    with pytest.raises(ValueError, match="rank=4"):
        load_adapter(apply_adapter(tiny(), "lora", rank=8, targets=MLP), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a nanoalign adapter directory"):
        load_adapter(tiny(), tmp_path)
    with pytest.raises(ValueError, match="no adapter"):
        save_adapter(tiny(), tmp_path / "b")


# ----------------------------------------------------------------------------- PEFT export

def hf_checkpoint(arch, path):
    transformers = pytest.importorskip("transformers")
    cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    cfg = cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def test_peft_export_keys_and_shapes_match_peft(tmp_path):
    """Exported keys/shapes equal `get_peft_model(hf, LoraConfig(...)).state_dict()`'s LoRA entries with the
    `.default` adapter name removed."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    d = hf_checkpoint("qwen2", tmp_path / "base")
    model = apply_adapter(CausalLM.from_pretrained(d), "lora", rank=4, alpha=8)
    export_peft(model, tmp_path / "peft", base_model_name_or_path=str(d))
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as f:
        ours = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    target = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, task_type="CAUSAL_LM"))
    theirs = {k.replace(".default", ""): tuple(v.shape) for k, v in pm.state_dict().items() if "lora_" in k}
    assert ours == theirs
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert sorted(cfg["target_modules"]) == sorted(target) and cfg["base_model_name_or_path"] == str(d)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_peft_export_loads_in_peft_with_same_logits(arch, tmp_path):
    """Our CausalLM + random adapter vs transformers + `PeftModel.from_pretrained(export)`: logits within 1e-5,
    for LoRA directly and for hydra-norouter / M-LoRA (rank 2r, compensation folded in) / MultiLoRA (rank n·r)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    d = hf_checkpoint(arch, tmp_path / "base")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits
    for kind, rank in (("lora", 4), ("align", 4), ("hydra-norouter", 4), ("mlora", 8), ("multilora", 12)):
        model = apply_adapter(CausalLM.from_pretrained(d), kind, rank=4, alpha=8, heads=3)
        randomize(model, std=0.1)
        out = export_peft(model, tmp_path / kind)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == rank
        with torch.no_grad():
            ours = model(ids)
            pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d), out).eval()
            theirs = pm(input_ids=ids).logits
        diff = (ours - theirs).abs().max().item()
        print(f"peft {arch:6s} {kind:15s} max|ours - peft| = {diff:.2e} (adapter effect {(ours - base).abs().max():.2f})")
        assert diff < 1e-5 and (ours - base).abs().max() > 1e-2


def test_peft_export_names_a_base_that_loads_offline(tmp_path, monkeypatch):
    """base_model_name_or_path is what transformers loads without nanoalign: a local model directory as its absolute
    path (the embedded model as its converted directory), an alias as its repo id; AutoPeftModelForCausalLM then
    loads the export with local files only and gives our logits."""
    peft = pytest.importorskip("peft")
    import nanoalign
    from nanoalign.plumbing import embedded
    from nanoalign.plumbing.hub import loadable_name
    d = hf_checkpoint("llama", tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = apply_adapter(nanoalign.plumbing.load_model("base"), "lora", rank=4, alpha=8)  # a relative path, as typed
    randomize(model, std=0.1)
    out = export_peft(model, tmp_path / "peft")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(d)
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - pm(input_ids=ids).logits).abs().max() < 1e-5
    monkeypatch.setattr(embedded, "ensure_smollm2", lambda: d)
    assert loadable_name("smollm2-135m") == str(d)
    assert loadable_name("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B" and loadable_name("Org/Name") == "Org/Name"


@pytest.mark.parametrize("kind", ["hydra", "rlora", "mtl"])
def test_peft_export_refuses_router_and_per_task(kind, tmp_path):
    """Router and per-task adapters have no PEFT LoRA form: export raises instead of writing something wrong."""
    model = apply_adapter(tiny(), kind, rank=4, targets=MLP, num_tasks=2)
    with pytest.raises(ValueError, match="no PEFT LoRA form"):
        export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()


