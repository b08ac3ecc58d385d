"""System facts in one place: the device, the dtypes, peak FLOP/s per GPU, the FLOPs convention for MFU, atomic
file writes, JSON reading and OS errors as one line. train.py, the benchmark and the tutorials all read them from here.

FLOPs convention (model FLOPs, 2 per multiply-add, counted for the work the step asks for):

    decoder matmuls  (4·N_frozen + 6·N_trainable) per real token: forward 2N, input gradient 2N, weight gradient
                     2N only where the weight trains. N covers every matrix of the blocks: base weights, adapter
                     weights (all heads: they all run) and adapter buffers (R-/M-LoRA's compensation).
    attention        12 · n_layers · d_attn · Σ_i L_i² per step (forward 4·d_attn per query-key pair, backward
                     twice that), over the full L_i × L_i square of each sequence's REAL length L_i (the PaLM /
                     nanoGPT convention counts the full square, no causal halving; padding is not counted).
    lm_head          4·V·d per position where logits are actually computed (forward + input gradient; 6·V·d if
                     it trained): only the labelled positions in nanoalign's step, every position for full logits.
    left out         embedding lookups, norms, activations, softmax, RoPE, the loss, the optimizer, and the
                     recomputation of gradient checkpointing (hardware FLOPs, not model FLOPs).

Inference (train=False) counts the forward only: 2·N per token, 4·n_layers·d_attn·Σ L_i², 2·V·d per logit.
Stated rather than modelled (together well under 1% of a step): the first block's q/k/v input gradient is
counted though autograd skips it (the frozen embeddings need no gradient); adapter tensors that are not per-token
matmuls (MTL-LoRA's per-task Λ_t and mixing logits, MultiLoRA's scales) count as if they were; R-LoRA's fused
matmul also computes a discarded gradient for its frozen compensation, which is not counted
(tests/test_system.py checks all three against torch.utils.flop_counter).
MFU = flops_per_token · tokens / seconds / peak_flops(device).
"""

import errno
import json
import math
import os
import resource
from pathlib import Path

import torch

# bf16 dense tensor-core peak (no 2:4 sparsity; NVIDIA's datasheets print the sparse figure, twice this, with
# an asterisk). Matched in order against torch.cuda.get_device_name(), so specific names come first.
PEAK_FLOPS = (
    # https://www.nvidia.com/en-us/data-center/h100/ (datasheet: BF16 Tensor Core 1,671 TFLOPS* NVL,
    # 1,513* PCIe, 1,979* SXM; * = with sparsity)
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),        # SXM5: "NVIDIA H100 80GB HBM3"
    # https://www.nvidia.com/en-us/data-center/h200/ (datasheet: BF16 1,671 TFLOPS* H200 NVL, 1,979* H200 SXM)
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    # https://www.nvidia.com/en-us/data-center/a100/ (datasheet: BF16 312 | 624* TFLOPS, 40 GB and 80 GB, SXM and
    # PCIe alike)
    ("A100", 312e12),
    # https://www.nvidia.com/en-us/data-center/l40s/ (datasheet: BF16 Tensor Core 362.05 | 733* TFLOPS)
    ("L40S", 362e12),
    # NVIDIA Ada GPU architecture whitepaper, Appendix A: RTX 4090 peak BF16 Tensor TFLOPS with FP32 accumulate
    # 165.2 | 330.4*
    ("4090", 165e12),
    # AWS's A10G has no NVIDIA datasheet; 70 TFLOPS bf16 tensor (the A10's datasheet says 125) as compared in
    # https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/
    ("A10G", 70e12),
)


def pick_device(name="auto") -> torch.device:
    """--device: auto (cuda when available), cpu, cuda or cuda:N; anything else is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: not a device nanoalign runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def base_dtype(device, name="auto") -> torch.dtype:
    """dtype of the frozen base weights: "auto" = bf16 on CUDA (half the memory), fp32 on CPU (CPUs without native
    bf16 run bf16 matmuls far slower); or "float32" / "bfloat16"."""
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in choices:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return choices[name]


def use_autocast(device, mode="auto") -> bool:
    """bf16 autocast for the matmuls: "auto" = on CUDA only, "bf16" = also on CPU, "off"."""
    if mode not in ("auto", "bf16", "off"):
        raise ValueError(f"autocast must be auto, bf16 or off, got {mode!r}")
    return mode == "bf16" or (mode == "auto" and torch.device(device).type == "cuda")


def peak_flops(device):
    """bf16 dense peak FLOP/s of a CUDA device from PEAK_FLOPS, None for CPUs and unknown GPUs (MFU is then "-")."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((v for key, v in PEAK_FLOPS if key.lower() in name), None)


def flops_coefficients(model, train=True):
    """(per token, per Σ L_i², per logit position): the FLOPs of a step over sequences of real lengths L_i with
    logits at P positions are  per_token · Σ L_i + per_sq · Σ L_i² + per_logit · P  (module docstring)."""
    frozen = trainable = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".layers." in f".{name}" and t.ndim >= 2:
            if t.requires_grad:
                trainable += t.numel()
            else:
                frozen += t.numel()
    c = model.config
    attn = c.num_hidden_layers * c.num_attention_heads * c.head_dim
    head = model.lm_head.weight.numel()
    if train:
        return 4 * frozen + 6 * trainable, 12 * attn, (6 if model.lm_head.weight.requires_grad else 4) * head
    return 2 * (frozen + trainable), 4 * attn, 2 * head


def flops_per_token(model, lengths, logit_positions=None, train=True) -> float:
    """Model FLOPs per real token of one step over sequences of `lengths` real tokens (module docstring).

    lengths: the real (non-pad) length of each sequence, as ints or a CPU tensor (attention_mask.sum(1) of the
    batch before it moves to the device; a CUDA tensor here would cost a host sync). logit_positions: how many
    positions get lm_head logits (the number of labelled positions with `logits_at`; None: every real token).
    """
    lengths = [int(n) for n in lengths]
    tokens = sum(lengths)
    if tokens <= 0:
        raise ValueError("flops_per_token needs at least one real token")
    per_token, per_sq, per_logit = flops_coefficients(model, train)
    positions = tokens if logit_positions is None else int(logit_positions)
    return (per_token * tokens + per_sq * sum(n * n for n in lengths) + per_logit * positions) / tokens


def peak_memory_mib(device) -> float:
    """Peak memory in MiB: allocated tensors on CUDA (since the last reset_peak_memory), the process's max RSS
    elsewhere (which cannot be reset, so on CPU it is the peak of the whole process)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if os.uname().sysname == "Darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def reset_peak_memory(device):
    """Start a new peak-memory phase on CUDA (no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def fsync(path):
    """Flush a file's or a directory's entries to disk (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part: into a temporary file
    in the same directory, fsynced, then os.replace, then the directory fsynced (so the rename survives a power
    loss); the temporary file is removed on failure. `data`: text (UTF-8), bytes, or a function that writes the
    temporary path it is given (savefig, safetensors' save_file). The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def write_json(path, obj, indent=2):
    """write_atomic of `obj` as JSON with a final newline (numpy scalars as floats, non-ASCII kept as is; NaN and
    ±inf, which JSON does not have, as null: e.g. the unknown SE of a single seed)."""
    write_atomic(path, json.dumps(_finite_or_none(obj), indent=indent, default=float, ensure_ascii=False,
                                  allow_nan=False) + "\n")


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return _finite_or_none(float(obj)) if obj.dtype.kind == "f" else obj.item()
    return obj


def read_json(path):
    """The JSON object of a file, or a ValueError naming the file (and line) and what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (damaged?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}; damaged or cut short?)") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deep (damaged?)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def os_error_line(e: OSError, flag="--out"):
    """An OSError as one line naming the file and what to do: a full disk, a read-only or unwritable `flag`."""
    if e.filename is None:
        return str(e)
    what = {errno.ENOSPC: "the disk is full; free space and run again (train.py: --resume continues from the last "
                          "checkpoint)",
            errno.EDQUOT: "the disk quota is used up; free space and run again",
            errno.EROFS: f"read-only file system; choose another {flag}",
            errno.EACCES: f"permission denied; choose a writable {flag}",
            errno.EPERM: f"not permitted; choose a writable {flag}",
            errno.ENOTDIR: "a part of the path is a file, not a directory"}.get(e.errno, e.strerror)
    return f"{e.filename}: {what}"
