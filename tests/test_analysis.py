"""Analysis helpers (experiments/analysis.py) against direct computations: pairwise cosine loops (METHODS §4.1) and
torch.linalg.svdvals of the dense ΔW, task-cluster
separation of pooled A-outputs against explicit loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanoalign.adapters import adapter_context, adapter_modules, apply_adapter
from experiments.analysis import (collect_a_outputs, delta_weight_spectrum, effective_rank, head_cosine_similarity,
                                layer_index, lowrank, pool_a_outputs, task_separation)
from nanoalign.model import CausalLM, ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny_with(kind, **kw):
    torch.manual_seed(0)
    model = apply_adapter(CausalLM(CFG).eval(), kind, rank=4, heads=3, targets=MLP, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_layer_index():
    """Layer numbers are read from `layers.<i>.` in the module path."""
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("layers.0.self_attn.q_proj") == 0
    assert layer_index("lm_head") is None


def test_head_cosine_similarity_matches_pairwise_loop():
    """One value per (layer, module type) = mean over i<j of cos(vec B_i, vec B_j), checked against a loop with
    F.cosine_similarity, and on hand-made heads (B, B, −B -> (1 − 1 − 1)/3)."""
    model = tiny_with("mlora")
    sims = head_cosine_similarity(model)
    assert set(sims) == {(i, p) for i in range(2) for p in MLP}
    for name, m in adapter_modules(model):
        B = m.lora_B.weight.detach().flatten(1)
        pairs = [F.cosine_similarity(B[i], B[j], dim=0).item() for i in range(3) for j in range(i + 1, 3)]
        assert math.isclose(sims[(layer_index(name), name.rsplit(".", 1)[-1])], sum(pairs) / 3, abs_tol=1e-6)
    m = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        m.lora_B.weight[1] = m.lora_B.weight[0] * 2.0  # scale does not matter
        m.lora_B.weight[2] = -m.lora_B.weight[0]
    assert math.isclose(head_cosine_similarity(model)[(1, "up_proj")], -1 / 3, abs_tol=1e-6)


def test_head_cosine_similarity_zero_heads_and_single_head_adapters():
    """Zero-initialised heads (HydraLoRA at step 0) have no direction -> NaN; plain LoRA has no heads -> no entry."""
    torch.manual_seed(0)
    hydra = apply_adapter(CausalLM(CFG), "hydra", rank=4, heads=3, targets=MLP)
    assert all(math.isnan(v) for v in head_cosine_similarity(hydra).values())
    assert len(head_cosine_similarity(hydra)) == 6
    assert head_cosine_similarity(apply_adapter(CausalLM(CFG), "lora", rank=4, targets=MLP)) == {}


def test_zero_init_heads_become_alike_random_init_heads_stay_apart():
    """Five AdamW steps (lr 1e-3, the claim grids' lr; dropout 0.1) of a next-token loss from one seed: HydraLoRA's
    zero-init heads, each moved by its router-weighted share of one gradient, end far more alike than R-LoRA's
    independent random heads, which start near orthogonal and stay so (tutorial 03's mechanism cell)."""
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    sims = {}
    for kind in ("hydra", "rlora"):
        torch.manual_seed(0)
        model = apply_adapter(CausalLM(CFG), kind, rank=4, heads=3, targets=MLP, dropout=0.1).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        start = head_cosine_similarity(model)
        for _ in range(5):
            F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        sims[kind] = (start, head_cosine_similarity(model))
    assert all(math.isnan(v) for v in sims["hydra"][0].values())      # zero heads: no direction at step 0
    assert all(abs(v) < 0.3 for v in sims["rlora"][0].values())
    # measured: HydraLoRA 0.56-0.97 per module, R-LoRA −0.005 to 0.05
    assert min(sims["hydra"][1].values()) > 0.4 and max(abs(v) for v in sims["rlora"][1].values()) < 0.2


@pytest.mark.parametrize("kind, k", [("lora", 4), ("mlora", 8), ("multilora", 12), ("hydra", 4), ("mtl", 4)])
def test_delta_weight_spectrum_matches_dense_svd(kind, k):
    """The k singular values from the factored ΔW equal torch.linalg.svdvals of the dense ΔW (whose remaining
    values are 0); for mergeable adapters ΔW is exactly what changes the layer's eval-mode output."""
    model = tiny_with(kind, **({"num_tasks": 2} if kind == "mtl" else {}))
    task = 1 if kind == "mtl" else None
    spectra = delta_weight_spectrum(model, task=task)
    assert list(spectra) == [n for n, _ in adapter_modules(model)]
    for name, m in adapter_modules(model):
        B, A, s = lowrank(m, task)  # a router adapter's at a uniform router, as the spectrum reads it
        dense = (s * B) @ A
        if not hasattr(m, "lora_router"):
            assert torch.equal(dense, m.delta_weight(task))
        full = torch.linalg.svdvals(dense)
        assert spectra[name].shape == (k,)
        assert torch.allclose(spectra[name], full[:k], atol=1e-5, rtol=1e-4)
        assert full[k:].abs().max() < 1e-5
        if m.mergeable:
            x = torch.randn(3, m.in_features)
            with adapter_context(model):
                y = m(x)
            assert torch.allclose(y, x @ (m.weight + dense).T + (0 if m.bias is None else m.bias), atol=1e-5)
    if kind == "mtl":  # ΔW_t differs per task: no task, no spectrum
        with pytest.raises(ValueError, match="pass task"):
            delta_weight_spectrum(model)


def test_effective_rank():
    """exp(entropy of s/Σs): k equal values -> k; one non-zero value -> 1; all zero (ΔW = 0) -> 0."""
    assert math.isclose(effective_rank(torch.ones(5)), 5.0)
    assert math.isclose(effective_rank(torch.tensor([3.0, 0.0, 0.0])), 1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    assert 1.0 < effective_rank(torch.tensor([4.0, 1.0])) < 2.0


def test_pooled_a_outputs_average_real_tokens_of_each_example():
    """collect_a_outputs then pool_a_outputs (what separation_probe does): per-example mean of A·x over the attention
    mask, equal to a direct computation from each module's input (captured here with a hook, for the test only);
    padding positions do not count; dropout is off (eval)."""
    model = tiny_with("lora", dropout=0.5).train()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False                                      # a left-padded row
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: inputs.__setitem__(n, inp[0]))
             for n, m in adapter_modules(model)]
    feats = pool_a_outputs(collect_a_outputs(model, ids, mask), mask)
    for h in hooks:
        h.remove()
    assert model.training                                    # restored
    assert set(feats) == set(inputs) and len(feats) == 6
    for name, m in adapter_modules(model):
        z = inputs[name] @ m.lora_A.weight.T                 # [B, T, r], no dropout
        for b in range(3):
            torch.testing.assert_close(feats[name][b], z[b][mask[b]].mean(0), atol=1e-5, rtol=1e-5)


def test_task_separation_against_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g)
    t = torch.tensor([0, 1, 2] * 4)
    x[t == 1] += 3.0
    got = task_separation(x, t)
    mus = [x[t == k].double().mean(0) for k in range(3)]
    between = sum((mus[p] - mus[q]).norm() for p in range(3) for q in range(p + 1, 3)) / 3
    within = math.sqrt(sum(((x[t == k].double() - mus[k]) ** 2).sum(-1).mean() for k in range(3)) / 3)
    assert got["between"] == pytest.approx(between.item(), rel=1e-9)
    assert got["within"] == pytest.approx(within, rel=1e-9)
    assert got["ratio"] == pytest.approx(between.item() / within, rel=1e-9)
    # the same rows with the task labels shuffled across the shifted cluster: clusters on top of each other
    assert task_separation(x, t[torch.randperm(12, generator=g)])["ratio"] < got["ratio"]
    # scale-free
    assert task_separation(10 * x, t)["ratio"] == pytest.approx(got["ratio"], rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        task_separation(x, torch.zeros(12, dtype=torch.long))
