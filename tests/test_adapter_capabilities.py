"""Adapter capabilities (`mergeable`, `needs_task_ids`, `lowrank()`'s refusals) against what each adapter actually
does, and MTL-LoRA's per-task merge and PEFT export (METHODS §2.7: ΔW_t = s·B̃_t Λ_t A) against the unmerged adapter
and against `peft` itself; R-LoRA / M-LoRA's init compensation C stays a constant (METHODS §2.5)."""

import copy

import pytest
import torch

from nanoalign.adapters import KINDS, adapter_context, adapter_modules, apply_adapter, merge_adapters
from nanoalign.plumbing.adapter_io import check_options, export_peft
from nanoalign.model import CausalLM
from test_adapter_io import hf_checkpoint
from test_adapters import MLP, batch, randomize, tiny


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


def refusal(m, task=None):
    """lowrank()'s reason why `m` has no fixed ΔW, or None."""
    try:
        m.lowrank(task)
        return None
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("kind, options", [(k, {}) for k in KINDS] + [("rlora", {"multi_head_dropout": False}),
                                                                        ("hydra-norouter", {"head_reduction": "mean"})])
def test_capabilities_describe_behaviour(kind, options, tmp_path):
    """For every kind, what an adapter says of itself is what it does, and every module of the model says the same:
    mergeable iff merge_adapters succeeds and iff lowrank() gives a form, ΔW per task (merges with task=1) iff
    needs_task_ids iff a forward without task ids is refused, heads iff lora_B holds N matrices, a router iff
    lowrank() says ΔW depends on x, a PEFT LoRA (per task where ΔW depends on it) iff mergeable or per task."""
    model = built(kind, **options)
    mods = [m for _, m in adapter_modules(model)]
    m = mods[0]
    assert all((a.mergeable, a.needs_task_ids, refusal(a)) == (m.mergeable, m.needs_task_ids, refusal(m)) for a in mods)
    ids, _ = batch()
    assert m.mergeable is merges(model) is (refusal(m) is None)
    per_task = not m.mergeable and merges(model, task=1)
    assert m.needs_task_ids is per_task
    assert m.needs_task_ids is not runs_without_task_ids(model, ids)
    assert hasattr(m, "heads") is (m.lora_B.weight.dim() == 3)
    assert (getattr(m, "lora_router", None) is not None) is ("depend on the input x" in (refusal(m) or ""))
    assert (m.mergeable or per_task) is exports(model, tmp_path / "peft", task=0 if per_task else None)


def test_capabilities_of_the_kinds(tmp_path):
    """The table the callers rely on (METHODS §2): which kinds merge, need task ids, have heads or a router, export a
    PEFT LoRA; lowrank() says why where there is no fixed ΔW (a router: it depends on x; MTL-LoRA without task: it
    depends on the task id)."""
    models = {k: built(k) for k in KINDS}
    table = {k: adapter_modules(model)[0][1] for k, model in models.items()}
    assert [k for k, m in table.items() if m.mergeable] == ["lora", "align", "hydra-norouter", "mlora", "multilora"]
    assert [k for k, m in table.items() if m.needs_task_ids] == ["mtl"]
    assert [k for k, m in table.items() if hasattr(m, "lora_router")] == ["hydra", "rlora"]
    assert [k for k, m in table.items() if not hasattr(m, "heads")] == ["lora", "align"]
    assert [k for k, model in models.items()
            if not exports(model, tmp_path / k, task=0 if table[k].needs_task_ids else None)] == ["hydra", "rlora"]
    for k in ("hydra", "rlora"):
        with pytest.raises(ValueError, match="its router makes ΔW depend on the input x"):
            table[k].lowrank()
    with pytest.raises(ValueError, match=r"ΔW depends on the task id .*pass task="):
        table["mtl"].lowrank()
    with pytest.raises(ValueError, match="unknown adapter kind"):
        check_options("lora2", {})
    with pytest.raises(ValueError, match="no adapter"):
        export_peft(tiny(), tmp_path / "none")


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
