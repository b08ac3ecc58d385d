"""The run directory's saved state: log.jsonl, and checkpoints (adapter, optimizer.safetensors, every rank's
rng.safetensors, state.json) written so a crash at any moment leaves a complete one, checked file by file on resume.
Safetensors and JSON only: nothing is unpickled.
"""

import errno
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .adapter_io import load_adapter, save_adapter
from .system import fsync, read_json, write_atomic


def rng_states(device, world):
    """Every rank's torch RNG state (CPU, plus CUDA) as uint8 tensors, gathered so rank 0 can save them all."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    if world == 1:
        return [state]
    out = [torch.empty_like(state, device=device) for _ in range(world)]
    dist.all_gather(out, state.to(device))
    return [s.cpu() for s in out]


def set_rng_state(state, device):
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[n:].clone(), device)


RUN_STATE = ("checkpoint", "checkpoint.old", "log.jsonl")  # what a fresh start would destroy


def check_fresh_start(out: Path, overwrite):
    """Forgetting --resume must not destroy a run: starting fresh over one needs --overwrite."""
    found = [name for name in RUN_STATE if (out / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{out} holds an earlier run ({', '.join(found)}): pass --resume to continue it, or "
                              "--overwrite to delete it and start fresh")


def clear_run_state(out: Path):
    """--overwrite: the earlier run's checkpoints and log go (its adapter and results are replaced at the end)."""
    for name in (*RUN_STATE, "checkpoint.tmp"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def read_log(path: Path, say=print):
    """The records of log.jsonl; a torn last line is dropped with a note, any other damaged line is an error."""
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record")
            records.append(record)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(line.strip() for line in lines[i:]):
                raise ValueError(f"{path}:{i}: not a JSON record; the log is damaged (delete the line, or start "
                                 "again with --overwrite)") from None
            say(f"note: {path}:{i}: dropped a torn last line ({len(raw)} bytes)")
    return records


def save_tensors(tensors, file: Path):
    """safetensors' save_file; its SafetensorError (naming no file) becomes the OSError it wraps, with the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(file))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else errno.EIO, str(e), str(file)) from None


def save_checkpoint(path: Path, model, opt, step, batcher, extra, device, rank, world, params):
    """On every rank; rank 0 writes `<path>.tmp/` then renames, so a crash leaves `path` or `<path>.old` whole."""
    rngs = rng_states(device, world)
    if rank != 0:
        return
    if not bool(torch.nn.utils.get_total_norm([p.detach() for p in params]).isfinite()):  # NaN, inf, or > ~1e19
        raise FloatingPointError(f"refusing to write {path} at step {step}: the adapter weights are not finite")
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_adapter(model, tmp)
        sd = opt.state_dict()
        save_tensors({f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
                      for k, v in st.items()}, tmp / "optimizer.safetensors")
        save_tensors({f"rank{r}": s for r, s in enumerate(rngs)}, tmp / "rng.safetensors")
        state = {"step": step, "world_size": world, "batcher": batcher.state_dict(),
                 "optimizer_groups": sd["param_groups"], **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Checkpoint:
    """A checkpoint read back whole (its adapter is loaded from `path` by load_adapter)."""
    path: Path
    state: dict
    optimizer: dict
    rng: dict


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check every file of a checkpoint directory, or a ValueError naming the bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    state = read_json(path / "state.json") if (path / "state.json").is_file() else None
    if state is None or not all(k in state for k in ("step", "world_size", "batcher", "optimizer_groups", "config")):
        raise ValueError(f"{path / 'state.json'}: missing or incomplete")
    _check_state(path / "state.json", state)
    read_json(path / "adapter_config.json")
    tensors = {}
    for name in ("adapter", "optimizer", "rng"):
        file = path / f"{name}.safetensors"
        try:
            tensors[name] = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    if not all(bool(t.isfinite().all()) for t in tensors["adapter"].values()):
        raise ValueError(f"{path / 'adapter.safetensors'}: holds non-finite weights")
    n = torch.get_rng_state().numel()
    rng = [tensors["rng"].get(f"rank{r}") for r in range(state["world_size"])]
    if any(t is None or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() < n for t in rng):
        raise ValueError(f"{path / 'rng.safetensors'}: lacks a complete RNG state for each of its "
                         f"{state['world_size']} rank(s)")
    return Checkpoint(path, state, tensors["optimizer"], tensors["rng"])


def _check_state(file, state):
    """state.json's values have the types and ranges train.py writes (a hand edit or damage must not pass)."""
    def count(v, low, high):
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    cfg = state["config"]
    last = cfg.get("max_steps") if isinstance(cfg, dict) and count(cfg.get("max_steps"), 1, 10**12) else 10**12
    ok = {"config": isinstance(cfg, dict), "step": count(state["step"], 0, last),
          "world_size": count(state["world_size"], 1, 10**6), "batcher": isinstance(state["batcher"], dict),
          "optimizer_groups": isinstance(state["optimizer_groups"], list)
          and all(isinstance(g, dict) for g in state["optimizer_groups"])}
    bad = [f"{k}={repr(state[k])[:40]}" for k, good in ok.items() if not good]
    if bad:
        raise ValueError(f"{file}: {', '.join(bad)} is not what train.py writes (step: 0 to the run's max_steps "
                         f"{last}; config, batcher: objects)")


def find_checkpoint(path: Path, say=print) -> Checkpoint:
    """The checkpoint to resume from: `path`, else `<path>.old` (a crash between save_checkpoint's renames)."""
    problems = []
    for d in (path, path.with_name(path.name + ".old")):
        if not d.is_dir():
            continue
        try:
            ckpt = read_checkpoint(d)
        except ValueError as e:
            problems.append(str(e))
            continue
        if problems:
            say(f"note: {problems[0]}; resuming from {d} instead")
        return ckpt
    if problems:
        raise ValueError(f"cannot resume: {'; '.join(problems)}. Restore the file, or start again with --overwrite")
    fresh = "--overwrite" if (path.parent / "log.jsonl").exists() else "without --resume"
    raise FileNotFoundError(f"{path}: no checkpoint to resume from; run {fresh} to start fresh")


def continue_run_dir(out: Path, ckpt: Checkpoint, say=print):
    """On resume: a damaged live checkpoint to checkpoint.bad, log.jsonl cut to the checkpoint's step."""
    live = out / "checkpoint"
    if ckpt.path != live and live.exists():
        shutil.rmtree(out / "checkpoint.bad", ignore_errors=True)
        live.rename(out / "checkpoint.bad")
        say(f"note: moved the damaged checkpoint to {out / 'checkpoint.bad'}")
    log = out / "log.jsonl"
    if log.exists():
        keep = [r for r in read_log(log, say) if r["step"] <= ckpt.state["step"]]
        write_atomic(log, "".join(json.dumps(r) + "\n" for r in keep))


def load_checkpoint(ckpt: Checkpoint, model, opt, device, rank, world):
    """Adapter, optimizer and this rank's RNG state from a checkpoint (the data position is the caller's)."""
    if ckpt.state["world_size"] != world:
        raise ValueError(f"{ckpt.path} was written by {ckpt.state['world_size']} process(es); resume with the same "
                         f"number (this run has {world})")
    load_adapter(model, ckpt.path)  # a damaged file is one ValueError naming it
    state_by_param = {}
    for key, t in ckpt.optimizer.items():
        i, name = key.split(".", 1)
        state_by_param.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state_by_param, "param_groups": ckpt.state["optimizer_groups"]})
    set_rng_state(ckpt.rng[f"rank{rank}"], device)
