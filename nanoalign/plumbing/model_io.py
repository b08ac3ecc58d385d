"""`load(path)`: config.json, the weight files, the memory and every tensor's name and shape (headers only) checked,
each problem one line naming the file, then the book's `CausalLM.from_pretrained`."""

import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..model import CausalLM, ModelConfig
from .hub import shard_names
from .system import read_json

# the deepest published decoders have ~130 layers; 10^6 would take hours to build even on the meta device
MAX_LAYERS = 1024
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")


def positive(name, value, kind=int):
    """A ValueError naming `name` unless `value` is a positive int (not a bool, 2.0 or "2"), or kind=float: finite."""
    if isinstance(value, bool) or not isinstance(value, (int, kind)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'finite number'}, got {value!r}")


def check_hf_dict(d):
    """What ModelConfig.from_hf_dict needs of a config.json dict before it can read it."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: nanoalign implements SwiGLU (silu) MLPs")
    if d.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    rope, scaling = d.get("rope_parameters") or {}, d.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        raise ValueError("rope_parameters / rope_scaling must be JSON objects")
    if scaling or rope.get("rope_type", "default") != "default":
        kind = (scaling or rope).get("rope_type", (scaling or rope).get("type"))
        if kind not in ("llama3", "linear", "default"):
            raise ValueError(f"unsupported RoPE scaling {kind!r}: nanoalign implements default, linear and llama3")
    positive("rope_theta", rope.get("rope_theta", d.get("rope_theta", 10000.0)), float)
    positive("num_attention_heads", d["num_attention_heads"])
    if not d.get("head_dim"):
        positive("hidden_size", d["hidden_size"])


def check_config(cfg: ModelConfig):
    """Sizes before anything is built (not a TypeError deep in nn.Linear, or hours building 10^6 layers)."""
    for name in SIZES:
        positive(name, getattr(cfg, name))
    if cfg.num_hidden_layers > MAX_LAYERS:
        raise ValueError(f"num_hidden_layers={cfg.num_hidden_layers} is beyond any real decoder (nanoalign "
                         f"accepts up to {MAX_LAYERS}); the config.json is damaged")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({cfg.num_key_value_heads}) for grouped-query attention")
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {cfg.head_dim}")
    positive("rms_norm_eps", cfg.rms_norm_eps, float)  # rope_theta: check_hf_dict's, before float() reads it
    s = cfg.rope_scaling
    if s is not None:
        keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}[s["rope_type"]]
        for k in keys:
            positive(f"rope_scaling.{k}", s.get(k), float)
        if s["rope_type"] == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
            raise ValueError("rope_scaling.high_freq_factor must be larger than low_freq_factor")


def read_config(path) -> ModelConfig:
    """config.json -> ModelConfig, checked; every problem is one line that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; a model directory needs config.json next to its weights")
    d = read_json(path, "download the model's config.json again")
    try:
        check_hf_dict(d)
        cfg = ModelConfig.from_hf_dict(d)
        check_config(cfg)
        return cfg
    except KeyError as e:
        raise ValueError(f"{path}: not a valid Hugging Face config.json (missing key {e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """`model.safetensors`, or the shards named in `model.safetensors.index.json` (each must lie inside `path`)."""
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


def num_parameters(cfg: ModelConfig) -> int:
    """Parameter count of the model `cfg` builds (a tied lm_head counted once), without building it."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    n_q, n_kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = h * (n_q + 2 * n_kv) + n_q * h + (n_q + 2 * n_kv) * cfg.qkv_bias + h * cfg.o_bias
    mlp = 3 * h * i + (2 * i + h) * cfg.mlp_bias
    per_layer = attn + mlp + 2 * h  # + the two RMSNorm weights
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return embed + cfg.num_hidden_layers * per_layer + h


def memory_bytes(device) -> int | None:
    """Total (not free) memory of `device` in bytes, RAM capped by a cgroup v2 limit; None when unknown."""
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


def check_tensors(cfg: ModelConfig, files, path: Path):
    """Every tensor the model has is in `files` with its shape, and nothing else is (headers only, no data read)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen = set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key not in expected:
                        if key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq"):
                            continue  # tied copy or a cached buffer some exporters write: nothing to load
                        raise ValueError(f"{file}: unexpected tensor {key!r}; is this a Llama/Qwen2 checkpoint "
                                         "matching its config.json?")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(expected[key]):
                        raise ValueError(f"{file}: tensor {key!r} has shape {shape} but config.json implies "
                                         f"{tuple(expected[key])}; the weights do not match the config")
                    seen.add(key)
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e}); delete it and download "
                             "it again") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors (first: {missing[0]!r}); a shard may "
                         "be missing or the weights do not match config.json")


def load(path, dtype=torch.float32, device="cpu") -> CausalLM:
    """CausalLM.from_pretrained(path) after checking everything it reads (module docstring)."""
    path = Path(path)
    cfg = read_config(path / "config.json")
    files = weight_files(path)
    n, have = num_parameters(cfg), memory_bytes(device)
    need = n * dtype.itemsize
    if have is not None and need > have:  # fail now, not after filling the memory tensor by tensor
        raise ValueError(f"{path / 'config.json'}: a model of {n:,} parameters needs {need / 1e9:,.1f} GB in "
                         f"{dtype}, more than the {have / 1e9:,.1f} GB of memory on {device}; pick a smaller "
                         "model (or a 2-byte dtype such as torch.bfloat16)")
    check_tensors(cfg, files, path)
    try:
        return CausalLM.from_pretrained(path, dtype=dtype, device=device)
    except SafetensorError as e:  # data past a valid header: a file cut short in a way its header did not show
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e}); delete it and download it "
                         "again") from None
