"""System facts: the device, the dtypes, peak FLOP/s per GPU, the FLOPs convention for MFU, atomic file writes, JSON
reading and OS errors as one line.

FLOPs convention (model FLOPs, 2 per multiply-add; tests/test_system.py checks it against torch.utils.flop_counter):

    decoder matmuls  (4·N_frozen + 6·N_trainable) per real token; N: every matrix of the blocks (adapter buffers too)
    attention        12 · n_layers · d_attn · Σ_i L_i² per step, the full square of each real length (no halving)
    lm_head          4·V·d per position where logits are computed (6·V·d if it trains)
    left out         lookups, norms, activations, softmax, RoPE, loss, optimizer, checkpointing's recomputation

Inference (train=False) counts the forward only. MFU = flops_per_token · tokens / seconds / peak_flops(device).
"""

import errno
import json
import math
import os
import resource
from pathlib import Path

import torch

# bf16 dense tensor-core peak: half the sparse figure NVIDIA's datasheets print (nvidia.com/en-us/data-center/<gpu>,
# the Ada whitepaper for the 4090; A10G: baseten.co's A10 vs A10G comparison). Matched in order, specific names first.
PEAK_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12), ("A10G", 70e12))


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
    """dtype of the frozen base weights: "auto" = bf16 on CUDA, fp32 on CPU (slow bf16 matmuls); or a name."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


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
    """(per token, per Σ L_i², per logit position) FLOPs of a step, by the module docstring's convention."""
    named = [*model.named_parameters(), *model.named_buffers()]
    mats = [t for name, t in named if ".layers." in f".{name}" and t.ndim >= 2]
    trainable = sum(t.numel() for t in mats if t.requires_grad)
    frozen = sum(t.numel() for t in mats) - trainable
    c = model.config
    attn = c.num_hidden_layers * c.num_attention_heads * c.head_dim
    head = model.lm_head.weight.numel()
    if train:
        return 4 * frozen + 6 * trainable, 12 * attn, (6 if model.lm_head.weight.requires_grad else 4) * head
    return 2 * (frozen + trainable), 4 * attn, 2 * head


def flops_per_token(model, lengths, logit_positions=None, train=True) -> float:
    """Model FLOPs per real token of one step over sequences of `lengths` real tokens (ints or a CPU tensor: no
    host sync) with lm_head logits at `logit_positions` positions (None: every real token)."""
    lengths = [int(n) for n in lengths]
    tokens = sum(lengths)
    if tokens <= 0:
        raise ValueError("flops_per_token needs at least one real token")
    per_token, per_sq, per_logit = flops_coefficients(model, train)
    positions = tokens if logit_positions is None else int(logit_positions)
    return (per_token * tokens + per_sq * sum(n * n for n in lengths) + per_logit * positions) / tokens


def peak_memory_mib(device) -> float:
    """Peak memory in MiB: allocated tensors on CUDA (since reset_peak_memory), the process's max RSS elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if os.uname().sysname == "Darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def reset_peak_memory(device):
    """Start a new peak-memory phase on CUDA (no-op elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def pid_alive(pid: int) -> bool:
    """Is process `pid` (of this machine) still running? (a lock's or a work directory's owner)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def fsync(path):
    """Flush a file's or a directory's entries to disk (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write `data` (text, bytes, or a function writing the path it is given) so a reader sees the old file or the
    new one, never a part: a temporary file, fsynced, os.replace, the directory fsynced."""
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
    """write_atomic of `obj` as JSON with a final newline; NaN and ±inf (not JSON) as null. Returns the Path."""
    write_atomic(path, json.dumps(_finite_or_none(obj), indent=indent, default=float, ensure_ascii=False,
                                  allow_nan=False) + "\n")
    return Path(path)


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


def read_json(path, fix="damaged or cut short?"):
    """The JSON object of a file, or a ValueError naming the file (and line), what is wrong with it and `fix`."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {fix}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deep; {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}; {fix}")
    return value


def error_line(e, lower):
    """A caught error as the text of a CLI's one `error:` line: out of memory says what to `lower`, an OSError names
    its file and what to do (a full disk, a read-only or unwritable --out)."""
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory; lower {lower}"
    if not isinstance(e, OSError) or e.filename is None:
        return str(e)
    what = {errno.ENOSPC: "the disk is full; free space and run again (train.py: --resume continues from the last "
                          "checkpoint)",
            errno.EDQUOT: "the disk quota is used up; free space and run again",
            errno.EROFS: "read-only file system; choose another --out",
            errno.EACCES: "permission denied; choose a writable --out",
            errno.EPERM: "not permitted; choose a writable --out",
            errno.ENOTDIR: "a part of the path is a file, not a directory"}.get(e.errno, e.strerror)
    return f"{e.filename}: {what}"
