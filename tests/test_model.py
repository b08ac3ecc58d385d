"""The decoder against Hugging Face transformers (the reference implementation), on tiny random checkpoints; the
fast forms training swaps in (nanoalign/plumbing/fast.py) against the book's; the checked loader's error lines."""

import copy
import json

import pytest
import torch

from nanoalign.model import CausalLM, ModelConfig
from nanoalign.plumbing import fast, model_io
from nanoalign.plumbing.fast import is_right_padded, logit_indices

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # name: (architecture, extra config kwargs)
    "llama-gqa-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                                     tie_word_embeddings=False)),
    "llama3-rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2-gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_hf(arch, **kw):
    cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    cfg = cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6,
              max_position_embeddings=128, **kw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases at zero; make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    arch, kw = CONFIGS[request.param]
    hf = make_hf(arch, **kw)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, CausalLM.from_pretrained(d), d


def padded_batch(lengths, T, vocab=97, left=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n:] = True
        else:
            mask[i, :n] = True
    return ids.masked_fill(~mask, 0), mask


def test_logits_match_hf_without_padding(pair):
    """Full-sequence logits equal LlamaForCausalLM / Qwen2ForCausalLM within 1e-5 (fp32)."""
    hf, ours, _ = pair
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("left", [True, False])
def test_logits_match_hf_with_padding(pair, left):
    """Left and right padding: every real token's logits equal HF's given the same positions, and equal the
    logits of the same row run alone without padding."""
    hf, ours, _ = pair
    ids, mask = padded_batch([9, 4, 6], 9, left=left)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf(ids, attention_mask=mask.long(), position_ids=pos).logits
        assert (a - b)[mask].abs().max().item() < 1e-5
        for i in range(3):
            alone = ours(ids[i][mask[i]][None])[0]
            assert (a[i][mask[i]] - alone).abs().max().item() < 1e-5


def test_logits_at_selects_positions(pair):
    """`logits_at` returns exactly the rows of the full logits at the chosen positions, in row-major order."""
    _, ours, _ = pair
    ids, mask = padded_batch([7, 5], 7, left=False)
    sel = torch.zeros_like(mask)
    sel[0, [2, 5]] = True
    sel[1, 4] = True
    with torch.no_grad():
        full = ours(ids, mask)
        part = ours(ids, mask, logits_at=sel)
    assert part.shape == (3, 97)
    torch.testing.assert_close(part, full[sel], rtol=0, atol=1e-6)  # a smaller matmul: round-off only


def test_logits_at_indices_and_host_padding_flag(pair):
    """Flat indices from logit_indices select the same rows as the bool mask, bit for bit; right_padded=True on
    a right-padded batch (plain causal attention, no mask) and right_padded=False (the mask applied) give the
    same logits at real tokens as the undecided default, which checks the mask itself (the fast forms)."""
    ours = fast.install(copy.deepcopy(pair[1]))
    ids, mask = padded_batch([7, 3, 5], 7, left=False)
    sel = mask.clone()
    sel[:, 0] = False
    with torch.no_grad():
        by_mask = ours(ids, mask, logits_at=sel)
        by_index = ours(ids, mask, logits_at=logit_indices(sel))
        torch.testing.assert_close(by_index, by_mask, rtol=0, atol=0)
        auto = ours(ids, mask)
        for flag in (True, False):
            torch.testing.assert_close(ours(ids, mask, right_padded=flag)[mask], auto[mask], rtol=0, atol=1e-5)
    assert is_right_padded(mask) and not is_right_padded(padded_batch([7, 3], 7, left=True)[1])
    with pytest.raises(ValueError, match="bool"):
        logit_indices(sel.long())
    with pytest.raises(ValueError, match="logits_at"):
        ours(ids, mask, logits_at=sel.long())   # a 0/1 integer mask is not a list of indices


def test_greedy_generation_cache_equals_no_cache_and_hf(pair):
    """Batched greedy decoding with a KV cache and left padding equals (a) re-running the full sequence at each
    step without a cache and (b) transformers' generate()."""
    hf, ours, _ = pair
    ids, mask = padded_batch([6, 3, 5], 6, left=True)
    n = 8
    got = ours.generate(ids, mask, max_new_tokens=n)
    # (a) no cache: append the argmax and run everything again
    seq, m = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = ours(seq, m)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones(3, 1, dtype=torch.bool)], 1)
    assert torch.equal(got, seq[:, -n:])
    # (b) the reference
    ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref[:, -n:])


def test_generation_stops_at_eos_and_pads():
    """Rows that produced eos are padded afterwards; sampling with a seeded generator is reproducible."""
    hf = make_hf("llama", num_attention_heads=4, num_key_value_heads=2)
    ours = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask = padded_batch([4, 4], 4)
    free = ours.generate(ids, mask, max_new_tokens=6)
    eos = int(free[0, 1])
    out = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1)
    row = out[0].tolist()
    assert row[1] == eos and all(t == -1 for t in row[2:])
    s1 = ours.generate(ids, mask, 5, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    s2 = ours.generate(ids, mask, 5, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


def test_gradient_checkpointing_gives_same_gradients(pair):
    """Per-block non-reentrant checkpointing changes memory, not math: every gradient is equal with it on and off,
    including when only a middle layer is trainable (the frozen-embedding case that breaks reentrant mode)."""
    _, ours, _ = pair
    ids, mask = padded_batch([8, 5], 8, left=False)
    for p in ours.parameters():
        p.requires_grad_(False)
    trainable = [ours.model.layers[1].mlp.up_proj.weight, ours.model.layers[0].self_attn.q_proj.weight]
    for p in trainable:
        p.requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        loss = ours(ids, mask).logsumexp(-1)[mask].mean()
        grads.append(torch.autograd.grad(loss, trainable))
    ours.gradient_checkpointing = False
    for p in ours.parameters():
        p.requires_grad_(False)
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_loads_sharded_checkpoint_strictly(tmp_path):
    """A sharded checkpoint (`model.safetensors.index.json`) loads to the same logits as the single file; the module
    names are HF's, so load_state_dict(strict=True) of HF's own state dict works with no mapping."""
    hf = make_hf("qwen2", num_attention_heads=4, num_key_value_heads=2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = CausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-5
    fresh = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()))
    fresh.load_state_dict(hf.state_dict(), strict=True)


def test_bf16_load_dtype(tmp_path):
    """Weights are cast while loading: a bf16 model has only bf16 floating-point parameters."""
    make_hf("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    m = CausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the fast forms equal the book's

def grads_of(model, ids, mask, **kw):
    """Logits at real tokens and d(their logsumexp mean)/d(every parameter) of a model in training mode."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, mask, **kw)
    out = logits if "logits_at" in kw else logits[mask]
    out.logsumexp(-1).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_fast_forms_equal_the_book(pair, padding):
    """install() swaps classes in place (same parameters and state_dict, idempotent). Its forward and every gradient
    equal the book model's: bitwise without padding and with left padding (the mask then is applied by both; fp32,
    CPU), within 1e-5 on a right-padded batch, where the fast form runs plain causal attention
    (right_padded=True) and the book applies the mask; logits at flat indices equal those at the bool mask."""
    book = copy.deepcopy(pair[1]).train().requires_grad_(True)
    quick = fast.install(copy.deepcopy(book))
    assert fast.install(quick) is quick and type(quick).__name__ == "FastCausalLM"
    assert {type(m).__name__ for m in quick.modules()} >= {"FastDecoder", "FastAttention", "FastMLP"}
    assert all(torch.equal(a, b) for a, b in zip(book.state_dict().values(), quick.state_dict().values()))
    if padding == "none":
        ids, mask = padded_batch([9, 9, 9], 9)
    else:
        ids, mask = padded_batch([9, 4, 6], 9, left=padding == "left")
    at = mask.clone()
    at[:, :2] = False
    want, g_want = grads_of(book, ids, mask)
    kw = {"right_padded": True} if padding == "right" else {}
    got, g_got = grads_of(quick, ids, mask, **kw)
    sel, g_sel = grads_of(quick, ids, mask, logits_at=logit_indices(at), **kw)
    bitwise = padding != "right"
    tol = dict(rtol=0, atol=0) if bitwise else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(sel, got[at[mask]], rtol=0, atol=1e-6)   # a smaller matmul: round-off only
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], **tol, msg=n)


def test_fused_swiglu_equals_autograd():
    """fast.SwiGLU: the forward and the gradients (silu_backward, as autograd runs it) are bitwise those of
    silu(g) * u; with create_graph (MeTA-LoRA's second order) its gradient and second derivative match within 1e-6."""
    g0, u0 = torch.randn(2, 5, 16, dtype=torch.float32), torch.randn(2, 5, 16, dtype=torch.float32)
    dy = torch.randn(2, 5, 16)
    res = []
    for f in (lambda g, u: torch.nn.functional.silu(g) * u, fast.SwiGLU.apply):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        y = f(g, u)
        first = torch.autograd.grad(y, (g, u), dy, retain_graph=True)
        dg, du = torch.autograd.grad(y, (g, u), dy, create_graph=True)
        second = torch.autograd.grad((dg * dg).sum() + (du * du).sum(), (g, u))
        res.append((y, first, (dg, du), second))
    (y0, f0, c0, s0), (y1, f1, c1, s1) = res
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(f0, f1))
    for a, b in zip((*c0, *s0), (*c1, *s1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad input (model_io.load)

@pytest.fixture()
def saved(tmp_path):
    make_hf("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    return tmp_path


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model_io.load(tmp_path / "nope")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        model_io.load(saved)


def test_missing_shard(tmp_path):
    make_hf("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}.*missing"):
        model_io.load(tmp_path)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        model_io.load(saved)


def test_garbage_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        model_io.load(saved)


def test_shapes_disagree_with_config(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*has shape.*do not match"):
        model_io.load(saved)


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10})


def test_real_configs_parse():
    """Config fields of real hub configs (4.x style with rope_theta/rope_scaling) are read correctly."""
    qwen = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151936, "use_sliding_window": False,
            "hidden_act": "silu"}
    c = ModelConfig.from_hf_dict(qwen)
    assert (c.arch, c.head_dim, c.qkv_bias, c.o_bias, c.rope_theta) == ("qwen2", 64, True, False, 1e6)
    llama = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
             "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "rope_theta": 500000.0,
             "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"},
             "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64}
    c = ModelConfig.from_hf_dict(llama)
    assert c.rope_scaling["rope_type"] == "llama3" and not c.qkv_bias
