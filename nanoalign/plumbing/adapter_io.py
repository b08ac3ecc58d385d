"""Adapters meet the world (the methods: nanoalign/adapters.py): `apply_adapter_checked` (kind, options and memory
checked first), `save_adapter` / `load_adapter` (nanoalign's format, every field checked on load), and
`export_peft` / `export_peft_dirs` (a Hugging Face PEFT LoRA directory from an adapter's `lowrank()` form).
"""

import inspect
import json
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters import (DEFAULT_TARGETS, KINDS, AdapterLinear, adapter_args, adapter_modules, apply_adapter,
                        split_targets, target_linears)
from .model_io import memory_bytes
from .hub import loadable_name
from .system import write_atomic

MAX_ALPHA = 1e6  # no LoRA recipe comes near; alpha = 1e308 in a saved config made every logit non-finite


def check_options(kind, options):
    """A ValueError naming the valid choices for an unknown `kind`, or an option its class does not take."""
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(KINDS)}")
    cls, fixed = KINDS[kind]
    params = inspect.signature(cls.__init__).parameters
    allowed = set(params) - {"self", "base", "rank", "alpha", "dropout", "heads", "num_tasks"} - set(fixed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"adapter {kind!r} has no option {unknown[0]!r}; its options are {sorted(allowed)}")
    for name, value in options.items():  # a typo like random_init="flase" must not pass as a truthy string
        default = params[name].default
        want = (int, float) if type(default) is float else type(default)
        is_bool = isinstance(value, bool)
        if default is not None and (not isinstance(value, want) or is_bool != isinstance(default, bool)):
            raise ValueError(f"adapter option {name} must be a {type(default).__name__} (default {default!r}), "
                             f"got {value!r}")


def adapter_bytes(cls, found, args) -> int:
    """Bytes of the adapter tensors `apply_adapter` would allocate (one adapter per layer shape, on meta)."""
    shapes = Counter((lin.in_features, lin.out_features) for _, lin in found)
    total = 0
    with torch.device("meta"):
        for (d_in, d_out), n in shapes.items():
            a = cls(nn.Linear(d_in, d_out, bias=False), **args)
            total += n * sum(t.numel() * t.element_size() for t in (*a.parameters(), *a.buffers()) if t is not a.weight)
    return total


def apply_adapter_checked(model, kind, rank=8, alpha=16, targets=DEFAULT_TARGETS, heads=3, dropout=0.0,
                          num_tasks=None, **options):
    """`adapters.apply_adapter` after checking the kind, the options and that the rank fits the device's memory,
    each a one-line ValueError (as is a failed allocation); the model is untouched when it raises."""
    check_options(kind, options)
    found = [] if getattr(model, "adapter_config", None) else target_linears(model, split_targets(targets))
    cls, args = adapter_args(kind, rank, alpha, dropout, heads, num_tasks, options)
    need = adapter_bytes(cls, found, args)  # bad option values raise here already; 0 where apply_adapter refuses
    device = found[0][1].weight.device if found else None
    have = memory_bytes(device) if found else None
    needs = f"rank {rank}: the {kind} adapters need {need:,} bytes ({need / 1e9:,.1f} GB, fp32)"
    if have is not None and need > have:
        raise ValueError(f"{needs}, more than the {have / 1e9:,.1f} GB of memory on {device}; choose a smaller rank")
    try:
        return apply_adapter(model, kind, rank=rank, alpha=alpha, targets=targets, heads=heads, dropout=dropout,
                             num_tasks=num_tasks, **options)
    except RuntimeError as e:  # torch.OutOfMemoryError is one; a CPU allocation failure says "can't allocate"
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise
        raise ValueError(f"{needs}, which {device} cannot allocate now; choose a smaller rank or free memory") from None


def _require_adapter(model):
    cfg = getattr(model, "adapter_config", None)
    if not cfg:
        raise ValueError("model has no adapter: call apply_adapter(model, kind, ...) or load_adapter(model, dir) first")
    return cfg


def _atomic_write(path: Path, write):
    """system.write_atomic of `write(tmp)`; a failure (disk full, read-only) is one OSError line naming `path`."""
    from safetensors import SafetensorError  # what save_file raises when its own write fails
    try:
        write_atomic(path, write)
    except (OSError, SafetensorError) as e:
        raise OSError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); free disk space or choose a "
                      "writable directory") from None


def _adapter_tensors(model):
    """{'<module path>.<local key>': tensor} for the adapter tensors only (no frozen weight/bias)."""
    return {f"{name}.{k}": v for name, m in adapter_modules(model)
            for k, v in m.state_dict(keep_vars=True).items() if k not in ("weight", "bias")}


def save_adapter(model, directory):
    """Write `adapter.safetensors` (adapter tensors only) and `adapter_config.json` into `directory`, atomically."""
    from safetensors.torch import save_file
    cfg = _require_adapter(model)
    d = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _adapter_tensors(model).items()}
    if any(t.is_meta for t in tensors.values()):
        raise ValueError("cannot save an adapter that lives on the meta device (it has no values)")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the adapter directory {d} ({e.strerror or e}); choose a writable path") from None
    _atomic_write(d / "adapter.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(d / "adapter_config.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))


def load_adapter(model, directory):
    """Load an adapter saved by `save_adapter`; applies it first when the model has none. Returns the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    d = Path(directory)
    cfg_file, st_file = d / "adapter_config.json", d / "adapter.safetensors"
    if not cfg_file.is_file() or not st_file.is_file():
        raise FileNotFoundError(f"{d}: not a nanoalign adapter directory (needs adapter_config.json and "
                                "adapter.safetensors, as written by save_adapter)")
    try:
        saved = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e}); the adapter is damaged: save or copy it again") from None
    if not isinstance(saved, dict) or saved.get("format") != "nanoalign-adapter":
        raise ValueError(f"{cfg_file}: not a nanoalign adapter config (a PEFT directory? load those with peft)")
    lacking = [k for k in ("kind", "rank", "alpha", "dropout", "targets", "heads", "num_tasks", "options",
                           "modules") if k not in saved]
    if lacking:
        raise ValueError(f"{cfg_file}: incomplete adapter config, missing {', '.join(lacking)}; the adapter is "
                         "damaged: save or copy it again")
    if not isinstance(saved["modules"], dict) or not isinstance(saved["options"], dict):
        raise ValueError(f"{cfg_file}: 'modules' and 'options' must be JSON objects; save or copy the adapter again")
    alpha = saved["alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"{cfg_file}: alpha {alpha!r} is not a scale numerator in (0, {MAX_ALPHA:g}]; the adapter is "
                         "damaged: save or copy it again")
    have = {n: [m.out_features, m.in_features] for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, AdapterLinear))}
    for name, shape in saved["modules"].items():
        if have.get(name) != shape:
            raise ValueError(f"{d}: adapter was trained on a base where {name} is {shape}, but this model has "
                             f"{have.get(name, 'no such layer')}; load it into the base model it was trained on")
    current = getattr(model, "adapter_config", None)
    if current is None:
        try:
            apply_adapter_checked(model, saved["kind"], rank=saved["rank"], alpha=saved["alpha"],
                                  targets=saved["targets"], heads=saved["heads"], dropout=saved["dropout"],
                                  num_tasks=saved["num_tasks"], **saved["options"])
        except (TypeError, ValueError) as e:  # a hand-edited value: name the file it came from
            raise ValueError(f"{cfg_file}: {e}") from None
        current = model.adapter_config
    for key in ("kind", "rank", "alpha", "heads", "num_tasks", "options", "modules"):
        if current[key] != saved[key]:
            raise ValueError(f"{d}: saved adapter has {key}={saved[key]!r} but the model's adapter has "
                             f"{current[key]!r}; load it into a fresh base model instead")
    try:
        tensors = load_file(str(st_file))
    except SafetensorError as e:
        raise ValueError(f"{st_file}: corrupt or truncated safetensors file ({e}); save or copy the adapter "
                         "again") from None
    expected = _adapter_tensors(model)
    for k in sorted(set(expected) | set(tensors)):
        if k not in tensors or k not in expected or tensors[k].shape != expected[k].shape:
            raise ValueError(f"{st_file}: tensor {k!r} is missing, unexpected or of the wrong shape; the file does "
                             "not match its adapter_config.json")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return model


@torch.no_grad()
def peft_forms(model, task=None):
    """{module path: (B, A, lora_alpha, use_rslora)} of the PEFT LoRA computing each adapter's eval-mode ΔW: plain
    LoRA as it is, any other form with its scale folded into B (lora_alpha None); a ValueError where ΔW is not fixed."""
    forms = {}
    for name, m in adapter_modules(model):
        try:
            B, A, s = m.lowrank(task)
        except ValueError as e:
            for_task, hint = ("", "; use save_adapter (nanoalign format)") if task is None else \
                (f" for task {task!r}", "")
            kind = (getattr(model, "adapter_config", None) or {}).get("kind", type(m).__name__)
            raise ValueError(f"{kind} adapters have no PEFT LoRA form{for_task}: {e}{hint}") from None
        if s == m.scaling and A.shape[0] == m.rank:
            forms[name] = B, A, m.alpha, m.rank_stabilized
        else:
            forms[name] = s * B, A, None, False
    return forms


def export_peft(model, directory, base_model_name_or_path=None, task=None):
    """Write a Hugging Face PEFT LoRA directory of the adapter's exact low-rank ΔW (peft_forms; MTL-LoRA: one
    `task`'s; routers raise), its base named by `hub.loadable_name` so PEFT finds it without nanoalign."""
    from safetensors.torch import save_file
    cfg = _require_adapter(model)
    tensors, ranks = {}, set()
    for name, (B, A, alpha, rslora) in peft_forms(model, task).items():
        folded = alpha is None
        alpha = A.shape[0] if folded else alpha
        ranks.add(A.shape[0])
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    (r,) = ranks
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in cfg["modules"]}), "lora_dropout": cfg["dropout"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
        "base_model_name_or_path": loadable_name(base_model_name_or_path or cfg.get("base_model")),
    }
    note = {"exported_from": cfg["kind"], "rank": cfg["rank"], "alpha": cfg["alpha"], "heads": cfg["heads"],
            "exported_rank": r, "scaling_folded_into_B": folded, "task": task}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(d / "adapter_config.json", lambda p: p.write_text(json.dumps(peft_cfg, indent=2)))
    _atomic_write(d / "nanoalign_export.json", lambda p: p.write_text(json.dumps(note, indent=2)))
    return d


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a task name usable as a directory name as it is


def export_peft_dirs(model, directory, task_names=(), base_model_name_or_path=None):
    """export_peft into `directory`, or for a per-task adapter (MTL-LoRA) into `directory/<task>` per task name (in
    task-id order; an unsafe or repeated name becomes `task<id>`). Returns what was written, for a log line."""
    d = Path(directory)
    if not any(m.needs_task_ids for _, m in adapter_modules(model)):
        export_peft(model, d, base_model_name_or_path=base_model_name_or_path)
        return f"{d} (PEFT LoRA)"
    if not task_names:
        raise ValueError("a per-task adapter (MTL-LoRA) exports one PEFT LoRA per task and needs the task names "
                         "(adapter/tasks.json, written by train.py)")
    dirs, seen = [], set()
    keep = {t.lower(): i for i, t in reversed(list(enumerate(task_names))) if SAFE_NAME.fullmatch(t)}  # first
    for i, t in enumerate(task_names):
        name = t if keep.get(t.lower()) == i else f"task{i}"
        while name.lower() in seen or (name != t and name.lower() in keep):
            name += "_"
        seen.add(name.lower())
        dirs.append(name)
    for i, name in enumerate(dirs):
        export_peft(model, d / name, base_model_name_or_path=base_model_name_or_path, task=i)
    return f"{d}/{{{','.join(dirs)}}} (one PEFT LoRA per task)"
