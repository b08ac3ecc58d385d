"""Adapter capability attributes against what each adapter actually does, and MTL-LoRA's per-task merge and PEFT
export (METHODS §2.7: ΔW_t = s·B̃_t Λ_t A) against the unmerged adapter and against `peft` itself; R-LoRA / M-LoRA's
init compensation C stays a constant (METHODS §2.5)."""

import copy

import pytest
import torch

from nanoalign.adapters import (KINDS, adapter_capabilities, adapter_context, adapter_modules, apply_adapter,
                                export_peft, merge_adapters)
from nanoalign.model import CausalLM
from test_adapters import MLP, batch, hf_checkpoint, randomize, tiny


def built(kind, **options):
    return randomize(apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP, num_tasks=2, **options), std=0.2)


def merges(model, task=None):
    try:
        merge_adapters(copy.deepcopy(model), task=task)
        return True
    except ValueError:
        return False


def runs_without_task_ids(model, ids):
    try:
        with torch.no_grad():
            model(ids)
        return True
    except ValueError:
        return False


def exports(model, path, task=None):
    try:
        export_peft(model, path, task=task)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("kind, options", [(k, {}) for k in KINDS] + [("rlora", {"router": False})])
def test_capabilities_describe_behaviour(kind, options, tmp_path):
    """For every kind, the capabilities read from the kind name, from the model and from one adapter module agree,
    and each one is what the adapter does: mergeable iff merge_adapters succeeds, needs_task_ids iff a forward
    without task ids is refused, has_heads iff lora_B holds N matrices, has_router iff it has a router,
    peft_exportable iff export_peft writes a directory (per task when merges_per_task)."""
    model = built(kind, **options)
    caps = adapter_capabilities(kind, **options)
    assert caps == adapter_capabilities(model) == adapter_capabilities(adapter_modules(model)[0][1])
    m = adapter_modules(model)[0][1]
    ids, _ = batch()
    assert caps["mergeable"] is merges(model)
    assert caps["merges_per_task"] is (not caps["mergeable"] and merges(model, task=1))
    assert caps["needs_task_ids"] is not runs_without_task_ids(model, ids)
    assert caps["has_heads"] is (m.lora_B.weight.dim() == 3)
    assert caps["has_router"] is (getattr(m, "lora_router", None) is not None)
    task = 0 if caps["merges_per_task"] else None
    assert caps["peft_exportable"] is exports(model, tmp_path / "peft", task=task)


def test_capabilities_of_the_kinds():
    """The table the callers rely on (METHODS §2): which kinds merge, need task ids, have heads or a router."""
    table = {k: adapter_capabilities(k) for k in KINDS}
    assert [k for k, c in table.items() if c["mergeable"]] == ["lora", "align", "hydra-norouter", "mlora",
                                                                "multilora"]
    assert [k for k, c in table.items() if c["needs_task_ids"]] == ["mtl"]
    assert [k for k, c in table.items() if c["has_router"]] == ["hydra", "rlora"]
    assert [k for k, c in table.items() if not c["has_heads"]] == ["lora", "align"]
    assert [k for k, c in table.items() if not c["peft_exportable"]] == ["hydra", "rlora"]
    with pytest.raises(ValueError, match="unknown adapter kind"):
        adapter_capabilities("lora2")
    with pytest.raises(ValueError, match="no adapter"):
        adapter_capabilities(tiny())


def task_logits(model, ids, t):
    with torch.no_grad(), adapter_context(model, task_ids=torch.full((ids.shape[0],), t)):
        return model(ids)


@pytest.mark.parametrize("diagonal", [False, True])
def test_mtl_merge_per_task_equals_adapter(diagonal):
    """merge_adapters(model, task=t) gives plain nn.Linear layers whose logits equal the unmerged MTL-LoRA's for
    samples of task t (to fp32 round-off); the two tasks' merged models differ (ΔW_t depends on t)."""
    model = built("mtl", diagonal=diagonal)
    ids, _ = batch()
    merged = {}
    for t in (0, 1):
        ours = task_logits(model, ids, t)
        m = merge_adapters(copy.deepcopy(model), task=t)
        assert not adapter_modules(m) and not hasattr(m, "adapter_config")
        with torch.no_grad():
            merged[t] = m(ids)
        assert (merged[t] - ours).abs().max() < 1e-5
    assert (merged[0] - merged[1]).abs().max() > 1e-2


def test_mtl_merge_and_export_refusals(tmp_path):
    """Without task= MTL-LoRA still refuses to merge or export, naming the way out; a task id out of range and a
    task= on an adapter with one ΔW are clear errors; a refusal leaves the model untouched."""
    model = built("mtl")
    with pytest.raises(ValueError, match=r"mtl adapters cannot be merged: ΔW depends on the task id .*pass task="):
        merge_adapters(model)
    with pytest.raises(ValueError, match="mtl adapters have no PEFT LoRA form: .*pass task="):
        export_peft(model, tmp_path / "p")
    for bad in (2, -1, "sst2", True):
        with pytest.raises(ValueError, match=r"task must be a task id in \[0, 2\)"):
            merge_adapters(model, task=bad)
    with pytest.raises(ValueError, match=r"for task 2: task must be a task id"):
        export_peft(model, tmp_path / "p", task=2)
    assert len(adapter_modules(model)) == 6 and not (tmp_path / "p").exists()
    lora = built("lora")
    with pytest.raises(ValueError, match="lora adapters cannot be merged for task 0: .*drop task="):
        merge_adapters(lora, task=0)
    with pytest.raises(ValueError, match="drop task="):
        export_peft(lora, tmp_path / "q", task=0)


@pytest.mark.parametrize("diagonal", [False, True])
def test_mtl_export_per_task_loads_in_peft_with_same_logits(diagonal, tmp_path):
    """export_peft(model, dir, task=t) writes a rank-r PEFT LoRA that `PeftModel.from_pretrained` loads; its logits
    equal ours under adapter_context(task_ids=t) within 1e-5, for each task, and the adapter changes the logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import json
    d = hf_checkpoint("llama", tmp_path / "base")
    model = apply_adapter(CausalLM.from_pretrained(d), "mtl", rank=4, alpha=8, heads=3, num_tasks=2,
                          targets=MLP + ("q_proj", "v_proj"), diagonal=diagonal)
    randomize(model, std=0.1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(d)(input_ids=ids).logits
    for t in (0, 1):
        out = export_peft(model, tmp_path / f"task{t}", task=t)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (4, 4)
        assert json.loads((out / "nanoalign_export.json").read_text())["task"] == t
        ours = task_logits(model, ids, t)
        with torch.no_grad():
            pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d), out).eval()
            theirs = pm(input_ids=ids).logits
        diff = (ours - theirs).abs().max().item()
        print(f"peft mtl task {t} diagonal={diagonal}: max|ours - peft| = {diff:.2e} "
              f"(adapter effect {(ours - base).abs().max():.2f})")
        assert diff < 1e-5 and (ours - base).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["rlora", "mlora"])
def test_compensation_is_frozen(kind):
    """R-LoRA / M-LoRA's compensation C = comp_B·comp_A is a constant taken at init (METHODS §2.5): its buffers are
    graph leaves without grad, and A's gradient equals the one computed with C replaced by a detached copy (before
    the fix the buffer was a clone of lora_A with its graph, and at init M-LoRA's A gradient was exactly 0)."""
    model = randomize(apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP), std=0.2)
    m = adapter_modules(model)[0][1]
    assert all(b.is_leaf and not b.requires_grad for b in (m.comp_A, m.comp_B))
    fresh = apply_adapter(tiny(), kind, rank=4, heads=3, targets=MLP)  # at init, B_i = B_i⁰
    f = adapter_modules(fresh)[0][1]
    x = torch.randn(5, f.in_features)
    f(x).pow(2).sum().backward()
    got = f.lora_A.weight.grad.clone()
    f.lora_A.weight.grad = None
    f.comp_A, f.comp_B = f.comp_A.detach().clone(), f.comp_B.detach().clone()
    f(x).pow(2).sum().backward()
    assert torch.equal(got, f.lora_A.weight.grad) and got.abs().max() > 0
