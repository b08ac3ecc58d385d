"""A Llama / Qwen2 decoder in one file, with Hugging Face module names.

The parameter names are those of `transformers`' LlamaForCausalLM / Qwen2ForCausalLM, so a checkpoint loads with
no mapping table and a LoRA on `...mlp.up_proj` exports to PEFT by a string prefix.

    h   = x + Attn(RMSNorm(x))            Attn: q,k,v = xWq(+b), xWk(+b), xWv(+b); RoPE(q,k); softmax(qk^T/sqrt(d))v Wo
    out = h + Wdown( silu(Wgate h') * Wup h' ),   h' = RMSNorm(h)

Qwen2 differs from Llama only by a bias on q/k/v; Llama-3 adds a frequency-dependent RoPE rescaling. Positions
come from the attention mask, so a left-padded row gives the same logits as the unpadded row (batched generation).
This is the readable form; training swaps in fast forms that tests keep equal to it.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    arch: str = "llama"                 # "llama" or "qwen2"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    qkv_bias: bool = False              # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # the rest of config.json, kept for export

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """A Hugging Face `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        arch = (d.get("architectures") or [""])[0].lower() or d.get("model_type", "")
        arch = "qwen2" if "qwen2" in arch else "llama" if "llama" in arch else arch
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {d.get('architectures') or d.get('model_type')!r}: "
                             "nanoalign loads Llama and Qwen2 checkpoints (LlamaForCausalLM, Qwen2ForCausalLM)")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        heads, bias = d["num_attention_heads"], bool(d.get("attention_bias", False))
        return cls(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else bias, o_bias=False if arch == "qwen2" else bias,
            mlp_bias=bool(d.get("mlp_bias", False)), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"), extra=d,
        )

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        return cls.from_hf_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 like the reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), with Llama-3's smooth low/high-frequency rescaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    s = cfg.rope_scaling
    if s and s["rope_type"] == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s and s["rope_type"] == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def project(linear, x, a_outputs):
    """linear(x); an adapter (nanoalign.adapters) also puts its A-output into `a_outputs` when that is a dict."""
    return linear(x) if a_outputs is None or isinstance(linear, nn.Linear) else linear(x, a_outputs)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache=None, a_outputs=None):
        B, T, _ = x.shape
        q = project(self.q_proj, x, a_outputs).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = project(self.k_proj, x, a_outputs).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, x, a_outputs).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = self.attend(q, k, v, mask)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), a_outputs)

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(d) + mask) v; mask None: causal. Grouped-query: each k/v head serves n_head/n_kv
        q heads, so it is repeated for them."""
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, 1)
            v = v.repeat_interleave(self.n_head // self.n_kv, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, a_outputs=None):
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        h = F.silu(project(self.gate_proj, x, a_outputs)) * project(self.up_proj, x, a_outputs)
        return project(self.down_proj, h, a_outputs)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, collect=False):
        """-> (x, {adapter name: A-output}), the dict returned rather than stored: checkpoint (which re-runs the
        block in the backward) and torch.compile (which traces it) need a block without side effects."""
        a = {} if collect else None
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, a)
        return x + self.mlp(self.post_attention_layernorm(x), a), a or {}


class KVCache:
    """Preallocated keys/values for all layers: [layers, B, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already stored; advanced by the decoder after all layers ran

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_mask_4d(key_mask: torch.Tensor, T: int, past: int):
    """Boolean [B, 1, T, past+T]: query i sees key j if j is a real token and j <= past+i. A padding query also sees
    itself: with no key at all SDPA would return NaN (the row is never read)."""
    S = key_mask.shape[1]
    q_pos = torch.arange(past, past + T, device=key_mask.device)[:, None]
    k_pos = torch.arange(S, device=key_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.adapter_ctx = None  # set by nanoalign.adapters.adapter_context: where the blocks' A-outputs go

    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None, grad_ckpt=False):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:  # counted over real tokens: a padded row gets the positions it has alone
            position_ids = (torch.arange(past, past + T, device=input_ids.device).expand(B, T) if attention_mask is None
                            else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:])
        x = self.embed_tokens(input_ids)
        mask = self.mask(attention_mask, T, past, x)
        freqs = position_ids[..., None].float() * rope_frequencies(self.cfg, x.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        ctx = self.adapter_ctx
        collect = ctx is not None and ctx.collect
        for layer in self.layers:
            if grad_ckpt and torch.is_grad_enabled():
                # non-reentrant: gradients still reach adapters when the block input needs no grad (frozen embeddings)
                x, a = checkpoint(layer, x, cos, sin, mask, cache, collect, use_reentrant=False)
            else:
                x, a = layer(x, cos, sin, mask, cache, collect)
            for name, z in a.items():  # outside the checkpointed block: a re-run in the backward stores nothing
                ctx.put(name, z)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def mask(self, attention_mask, T, past, x):
        """The keys each query may see, bool [B, 1, T, past+T]; None: plain causal attention."""
        if attention_mask is not None:
            return attention_mask_4d(attention_mask.bool(), T, past)
        if past > 0:
            return torch.ones(x.shape[0], 1, T, past + T, dtype=torch.bool, device=x.device).tril(past)
        return None


class CausalLM(nn.Module):
    """Decoder + `lm_head`. `model(ids, mask)` -> logits [B, T, vocab]; with `logits_at` -> logits [N, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, *, logits_at=None, cache=None, position_ids=None,
                right_padded=None):
        """Logits at every position, or only at `logits_at` (a bool [B, T] mask or flat indices b·T + t).
        right_padded lets the fast form skip the mask; this form applies it whatever it is told."""
        h = self.model(input_ids, attention_mask, cache, position_ids, grad_ckpt=self.gradient_checkpointing)
        if logits_at is not None:  # only the chosen positions: a 152k-word vocab makes full logits the largest tensor
            h = h[logits_at] if logits_at.dtype == torch.bool else h.flatten(0, 1)[logits_at]
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, pad_token_id=0, generator=None):
        """Greedy (temperature 0) or sampled decoding with a KV cache of LEFT-padded prompts -> new tokens
        [B, max_new_tokens], padded after each row's eos."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if T > 1 and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           device=input_ids.device)
        p = next(self.parameters())
        cache = KVCache(self.config, B, T + max_new_tokens, p.dtype, p.device)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out, ids = [], input_ids
        for _ in range(max_new_tokens):
            h = self.model(ids, attention_mask, cache)
            logits = self.lm_head(h[:, -1]).float()  # left padding: every row's next token comes from the last column
            nxt = sample(logits, temperature, top_k, top_p, generator)
            out.append(torch.where(done, torch.full_like(nxt, pad_token_id), nxt))
            done |= torch.isin(nxt, eos)
            if bool(done.all()):  # one host sync per token, the price of stopping early
                break
            ids = nxt[:, None]  # finished rows keep decoding real ids (their output is replaced by padding)
            attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=torch.bool, device=ids.device)], 1)
        out = torch.stack(out, 1)
        return F.pad(out, (0, max_new_tokens - out.shape[1]), value=pad_token_id)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "CausalLM":
        """A Hugging Face checkpoint directory -> model, built on the meta device and filled by assignment from
        memory-mapped safetensors, so the weights are never held twice; strict, so every tensor must be there."""
        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        index = path / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                 if index.is_file() else ["model.safetensors"])
        state = {}
        for name in files:
            with safe_open(path / name, framework="pt", device="cpu") as f:
                state.update({k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys()
                              if not k.endswith("rotary_emb.inv_freq")})  # a cached buffer some exporters write
        if cfg.tie_word_embeddings:  # one matrix for both; a copy of lm_head.weight in the file is not used
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token from logits [B, V]: argmax at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
