"""Several processes (torchrun): the process group, sums over ranks, and an evaluation shared out over the ranks.

    torchrun --nproc_per_node 2 train.py ...    # RANK / WORLD_SIZE / LOCAL_RANK set by torchrun

Every rank walks the same task-balanced stream and keeps its own slice (nanoalign.data.BalancedBatcher), so each
rank's micro-batch is still balanced; the step (train.py) sums losses and counts over the ranks in one all-reduce.
"""

import os

import torch
import torch.distributed as dist

from ..evaluate import evaluate, task_result


def setup_distributed(device):
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def all_sum(t, world):
    """Sum a float64 tensor over ranks (e.g. the Ctrl-C flag), so every rank takes the same decisions; no host
    sync."""
    if world > 1:
        dist.all_reduce(t)
    return t


def evaluate_all_ranks(model, tok, tasks, env, **kw):
    """`evaluate` with the examples shared out over the ranks (rank r scores examples r, r + world, ...) and the
    records gathered back in their order, so every rank gets the whole result. Every rank works during an
    evaluation, and none waits inside a collective while another one evaluates alone (NCCL's watchdog kills a
    collective that waits longer than its timeout, e.g. 10 minutes)."""
    if env.world == 1:
        return evaluate(model, tok, tasks, **kw)
    shard = {t: rows[env.rank::env.world] for t, rows in tasks.items() if rows[env.rank::env.world]}
    mine = evaluate(model, tok, shard, progress=env.master, **kw)
    parts = [None] * env.world
    dist.all_gather_object(parts, {t: (r["mode"], r["records"]) for t, r in mine.items()})
    results = {}
    for t, rows in tasks.items():
        per_rank = [part.get(t, (None, [])) for part in parts]
        records = [per_rank[i % env.world][1][i // env.world] for i in range(len(rows))]
        results[t] = task_result(records, next(mode for mode, _ in per_rank if mode))
    return results
