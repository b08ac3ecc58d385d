"""A Llama / Qwen2 decoder in one file, with Hugging Face module names.

The parameter names are exactly those of `transformers`' LlamaForCausalLM / Qwen2ForCausalLM
(`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `model.layers.{i}.mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`), so a checkpoint loads with no mapping
table and a LoRA on `...mlp.up_proj` exports to PEFT by a string prefix.

    h   = x + Attn(RMSNorm(x))            Attn: q,k,v = xWq(+b), xWk(+b), xWv(+b); RoPE(q,k); softmax(qk^T/sqrt(d))v Wo
    out = h + Wdown( silu(Wgate h') * Wup h' ),   h' = RMSNorm(h)

Qwen2 differs from Llama only by a bias on q/k/v; Llama-3 adds a frequency-dependent RoPE rescaling. Both use
grouped-query attention (fewer k/v heads than q heads). Positions come from the attention mask, so a left-padded
row gives the same logits as the unpadded row (what batched generation needs).
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# the deepest published decoders have ~130 layers; 10^6 would take hours to build even on the meta device
MAX_LAYERS = 1024
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")


def positive_int(name, value):
    """`value` if it is a positive int (not a bool, not 2.0, not "2"), else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


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

    def __post_init__(self):
        """Check sizes before anything is built: a bad config.json fails here in one line, not as a negative
        dimension, a TypeError deep in nn.Linear, or a machine busy for hours building 10^6 layers."""
        if self.arch not in ("llama", "qwen2"):
            raise ValueError(f"arch must be 'llama' or 'qwen2', got {self.arch!r}")
        for name in SIZES:
            positive_int(name, getattr(self, name))
        if self.num_hidden_layers > MAX_LAYERS:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} is beyond any real decoder (nanoalign "
                             f"accepts up to {MAX_LAYERS}); the config.json is damaged")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")
        positive_number("rms_norm_eps", self.rms_norm_eps)
        positive_number("rope_theta", self.rope_theta)
        s = self.rope_scaling
        if s is not None:
            if not isinstance(s, dict):
                raise ValueError(f"rope_scaling must be a dict or None, got {s!r}")
            keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")}.get(s.get("rope_type"))
            if keys is None:
                raise ValueError(f"rope_scaling type must be 'linear' or 'llama3', got {s.get('rope_type')!r}")
            for k in keys:
                positive_number(f"rope_scaling.{k}", s.get(k))
            if s["rope_type"] == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
                raise ValueError("rope_scaling.high_freq_factor must be larger than low_freq_factor")

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (a tied lm_head counted once), without building it."""
        h, i = self.hidden_size, self.intermediate_size
        n_q, n_kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * (n_q + 2 * n_kv) + n_q * h + (n_q + 2 * n_kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h  # + the two RMSNorm weights
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + h

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(d, dict):
            raise ValueError(f"a Hugging Face config is a JSON object like {{\"hidden_size\": 576, ...}}, not a "
                             f"{type(d).__name__}")
        arch = (d.get("architectures") or [""])[0].lower() or d.get("model_type", "")
        arch = "qwen2" if "qwen2" in arch else "llama" if "llama" in arch else arch
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {d.get('architectures') or d.get('model_type')!r}: "
                             "nanoalign loads Llama and Qwen2 checkpoints (LlamaForCausalLM, Qwen2ForCausalLM)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: nanoalign implements SwiGLU (silu) MLPs")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict) or not isinstance(d.get("rope_scaling") or {}, dict):
            raise ValueError("rope_parameters / rope_scaling must be JSON objects")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"unsupported RoPE scaling {kind!r}: nanoalign implements default, linear and llama3")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        heads = positive_int("num_attention_heads", d["num_attention_heads"])
        bias = bool(d.get("attention_bias", False))
        return cls(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or positive_int("hidden_size", d["hidden_size"]) // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(positive_number("rope_theta", theta)),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else bias, o_bias=False if arch == "qwen2" else bias,
            mlp_bias=bool(d.get("mlp_bias", False)), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"), extra=d,
        )

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; a model directory needs config.json next to its weights")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); download the model's config.json again") from None
        try:
            return cls.from_hf_dict(d)
        except KeyError as e:
            raise ValueError(f"{path}: not a valid Hugging Face config.json (missing key {e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


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
        if mask is None:
            # plain causal attention: SDPA's flash / cuDNN kernels take it, grouped-query heads included
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        else:
            # with a mask, enable_gqa can leave only the math kernel on GPU: give every q head its k/v instead
            if self.n_kv != self.n_head:
                k = k.repeat_interleave(self.n_head // self.n_kv, 1)
                v = v.repeat_interleave(self.n_head // self.n_kv, 1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), a_outputs)


class SwiGLU(torch.autograd.Function):
    """silu(g) * u that keeps only g and u for the backward and recomputes silu(g) there.

    Autograd would also keep silu(g): one [tokens, d_ff] tensor per layer, ~190 MB for SmolLM2-135M at 8x128 in
    fp32. The gradients are the same ops autograd runs (silu_backward), so they are bitwise equal.
    """

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (MeTA-LoRA's second order): silu_backward has no derivative
            s = torch.sigmoid(g)
            return dy * u * s * (1 + g * (1 - s)), dy * F.silu(g)
        return torch.ops.aten.silu_backward(dy * u, g), dy * F.silu(g)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, a_outputs=None):
        h = SwiGLU.apply(project(self.gate_proj, x, a_outputs), project(self.up_proj, x, a_outputs))
        return project(self.down_proj, h, a_outputs)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, collect=False):
        """-> (x, {adapter name: A-output}) with the A-outputs of this block's adapters when `collect`, else {}.

        The dict is made here and returned, not stored anywhere: a block without side effects is what
        torch.utils.checkpoint (which re-runs it in the backward) and torch.compile (which traces it) need.
        """
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
    """Boolean [B, 1, T, past+T]: query i sees key j if j is a real token and j <= past+i.

    A query that is itself padding (left padding) would see no key at all and SDPA would return NaN; letting it
    see itself keeps every row finite. Those rows are padding and are never read.
    """
    S = key_mask.shape[1]
    q_pos = torch.arange(past, past + T, device=key_mask.device)[:, None]
    k_pos = torch.arange(S, device=key_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    return allowed[:, None]


def is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros: plain causal attention is then exact for every real token.

    Reads the mask's values: call it on the CPU batch before it moves to the device (on a GPU tensor it is a host
    sync, and under torch.compile a graph break) and pass the answer as `model(..., right_padded=...)`.
    """
    m = mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def logit_indices(at: torch.Tensor) -> torch.Tensor:
    """Flat indices b·T + t of the True entries of a bool [B, T] mask, for `model(..., logits_at=...)`.

    A bool `logits_at` selects rows by value (a data-dependent shape: a host sync and a graph break); these
    indices select the same rows in the same order by position. Compute them on the CPU batch, then move them.
    """
    if at.dtype != torch.bool or at.dim() != 2:
        raise ValueError(f"logit_indices takes a bool [batch, seq] mask, got {at.dtype} of shape {tuple(at.shape)}")
    return at.flatten().nonzero().squeeze(1)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.adapter_ctx = None  # set by nanoalign.adapters.adapter_context: where the blocks' A-outputs go

    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None, grad_ckpt=False,
                right_padded=None):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                                 "(batch, cached + new tokens)")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is not None and cache is None and right_padded is None:
            # undecided: look at the mask (a host sync on GPU); a traced graph cannot branch on values, so under
            # torch.compile the mask is applied as it is (exact for any padding, but no flash kernel)
            right_padded = False if torch.compiler.is_compiling() else is_right_padded(attention_mask)
        if attention_mask is not None and (cache is not None or not right_padded):
            mask = attention_mask_4d(attention_mask, T, past)
        elif cache is not None and past > 0:
            mask = torch.ones(B, 1, T, past + T, dtype=torch.bool, device=input_ids.device).tril(past)
        if mask is not None:
            # additive, once per forward: SDPA would turn a bool mask into this in every layer
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
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
        """Logits at every position, or only at `logits_at`: a bool [B, T] mask, or a LongTensor of flat indices
        b·T + t (`logit_indices`, computed on the host: no sync, one shape for torch.compile).

        right_padded: True when every row of `attention_mask` is real tokens then padding (then no mask is needed:
        plain causal attention, SDPA's fastest kernels); False applies the mask; None decides from the mask's
        values (`is_right_padded`: a host sync on GPU; under torch.compile the mask is applied).
        """
        h = self.model(input_ids, attention_mask, cache, position_ids, grad_ckpt=self.gradient_checkpointing,
                       right_padded=right_padded)
        if logits_at is not None:
            # only the chosen positions: a 152k-word vocab makes full logits the largest tensor
            if logits_at.dtype == torch.bool:
                h = h[logits_at]
            elif logits_at.dim() == 1 and not logits_at.is_floating_point():
                h = h.flatten(0, 1).index_select(0, logits_at)
            else:
                raise ValueError(f"logits_at must be a bool [batch, seq] mask or a 1-D integer tensor of flat indices "
                                 f"(logit_indices), got {logits_at.dtype} of shape {tuple(logits_at.shape)}")
        return self.lm_head(h)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, pad_token_id=0, generator=None):
        """Greedy (temperature 0) or sampled decoding with a KV cache; batches must be LEFT-padded.

        Returns the new tokens [B, max_new_tokens]; a row that emitted eos is filled with `pad_token_id` after it.
        """
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
        """Build on the meta device, then fill tensor by tensor from memory-mapped safetensors.

        Each tensor is read from the mapped file, cast to `dtype` on `device` and assigned, so peak memory is the
        model plus one tensor, never a second full copy. Every key the model has must be present (strict).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        n, have = cfg.num_parameters(), memory_bytes(device)
        need = n * dtype.itemsize
        if have is not None and need > have:  # fail now, not after filling the memory tensor by tensor
            raise ValueError(f"{path / 'config.json'}: a model of {n:,} parameters needs {need / 1e9:,.1f} GB in "
                             f"{dtype}, more than the {have / 1e9:,.1f} GB of memory on {device}; pick a smaller "
                             "model (or a 2-byte dtype such as torch.bfloat16)")
        with torch.device("meta"):
            model = cls(cfg)
        expected = dict(model.state_dict())
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
        state = {}
        for file in weight_files(path):
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for key in f.keys():
                        if key not in expected:
                            if key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq"):
                                continue  # tied copy or a cached buffer some exporters write: nothing to load
                            raise ValueError(f"{file}: unexpected tensor {key!r}; is this a Llama/Qwen2 checkpoint "
                                             "matching its config.json?")
                        t = f.get_tensor(key)
                        if t.shape != expected[key].shape:
                            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} but config.json "
                                             f"implies {tuple(expected[key].shape)}; the weights do not match the config")
                        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            except SafetensorError as e:
                raise ValueError(f"{file}: corrupt or truncated safetensors file ({e}); delete it and download "
                                 "it again") from None
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors (first: {missing[0]!r}); a shard may "
                             "be missing or the weights do not match config.json")
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def weight_files(path: Path) -> list[Path]:
    """`model.safetensors`, or the shards named in `model.safetensors.index.json` (each must lie inside `path`)."""
    from .plumbing.hub import shard_names
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / s for s in shard_names(index)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing; download the checkpoint again")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json; nanoalign reads "
                                "safetensors checkpoints only")
    return [single]


def memory_bytes(device) -> int | None:
    """Total memory of `device` in bytes: the GPU's, or the machine's RAM (capped by a cgroup v2 limit); None when
    unknown. Total, not free: the checks using it stop absurd sizes and must not refuse what would fit."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = ""
    return min(total, int(limit)) if limit.isdigit() else total


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
