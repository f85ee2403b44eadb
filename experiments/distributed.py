"""Multi-process training: process groups, gradient reduction, gathered statistics, failures.

    torchrun --nproc_per_node 4 -m experiments.train train.ep=2    # 2 data x 2 expert parallel

Ranks form a (dp, ep) grid: rank = d * ep + e. Every rank reads its own micro-batches (all ranks
are data parallel for the data); expert-parallel groups are the ranks of one row (consecutive
ranks), each holding a different slice of every MoE block's experts; data-parallel groups are the
ranks of one column, which hold the same slice. Gradients are reduced explicitly after the last
micro-batch: replicated parameters over all ranks, expert shards over their data-parallel
replicas only, both divided by the world size, so W ranks with `accumulate` a equal one process
with `accumulate` a * W on the same micro-batches.

Every collective runs under the process group's timeout (`train.timeout`): a rank that dies or
hangs makes the others stop with `PeerFailure` naming the rank and the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


class PeerFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or raised."""


@dataclass
class Parallel:
    """This process's place in the (dp, ep) grid and the groups it belongs to."""

    rank: int = 0
    world: int = 1
    ep: int = 1
    timeout: float = 300.0
    ep_group: object = None
    dp_group: object = None
    device: str = "cpu"  # where small collective tensors live: cuda under NCCL

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(ep: int = 1, timeout: float = 300.0, device: str = "cpu") -> Parallel:
    """Join the process group torchrun describes (env:// rendezvous) and build the (dp, ep) grid:
    gloo on CPU, NCCL on CUDA. A single process without a launcher gets `Parallel()` (ep must
    then be 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        if ep != 1:
            raise ValueError(f"train.ep ({ep}) > 1 needs several processes: launch with "
                             f"torchrun --nproc_per_node {ep} (or a multiple of {ep})")
        return Parallel(timeout=timeout)
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return grid(ep, timeout)


def grid(ep: int, timeout: float = 300.0) -> Parallel:
    """The (dp, ep) groups of an initialised world; every rank must call it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep < 1 or world % ep:
        raise ValueError(f"train.ep ({ep}) must be >= 1 and divide the number of processes "
                         f"({world})")
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    par = Parallel(rank=rank, world=world, ep=ep, timeout=timeout, device=device)
    for d in range(world // ep):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(d * ep, (d + 1) * ep)))
        if d == rank // ep:
            par.ep_group = group
    for e in range(ep):
        group = dist.new_group(list(range(e, world, ep)))
        if e == rank % ep:
            par.dp_group = group
    return par


@contextlib.contextmanager
def guard(par: Parallel):
    """Turn a failed collective into a `PeerFailure` that says what probably happened."""
    try:
        yield
    except PeerFailure:
        raise
    except (RuntimeError, dist.DistError) as e:
        if not par.enabled or not _looks_distributed(e):
            raise
        raise PeerFailure(f"rank {par.rank}/{par.world}: a collective failed -- another rank "
                          f"died, raised, or did not answer within train.timeout "
                          f"({par.timeout:g} s). Cause: {str(e).splitlines()[0]}") from e


def _looks_distributed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, dist.DistError) or any(word in text for word in (
        "gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket", "broken pipe"))


# ---- gradients ---------------------------------------------------------------------------------

@torch.no_grad()
def reduce_gradients(model: nn.Module, par: Parallel) -> None:
    """Average gradients over the world: replicated parameters over all ranks, expert shards over
    their data-parallel replicas (their expert-parallel peers hold other experts), each divided
    by the world size. A parameter without a gradient on every rank keeps none; one that has a
    gradient somewhere gets zeros elsewhere."""
    if not par.enabled:
        return
    from moe.parallel import is_expert_parameter

    experts = is_expert_parameter(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for group, members in ((None, [p for p in params if id(p) not in experts]),
                           (par.dp_group, [p for p in params if id(p) in experts])):
        if not members:
            continue
        has = torch.tensor([p.grad is not None for p in members], dtype=torch.int32,
                           device=par.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
        members = [p for p, h in zip(members, has.tolist()) if h]
        for p in members:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        dist.all_reduce(flat, group=group)
        flat /= par.world
        for p, g in zip(members, flat.split([p.numel() for p in members])):
            p.grad.copy_(g.view_as(p))


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, par: Parallel) -> torch.Tensor:
    """The global gradient norm (every expert counted once) and clipping to max_norm; equals
    `torch.nn.utils.clip_grad_norm_` of the unsharded model."""
    if not par.enabled:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    from moe.parallel import is_expert_parameter

    experts = is_expert_parameter(model)
    with_grads = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in with_grads]
    squares = [(id(p) in experts, p.grad.float().pow(2).sum()) for p in with_grads]
    zero = torch.zeros((), device=par.device)
    shared = sum((sq for is_expert, sq in squares if not is_expert), zero)
    local = sum((sq for is_expert, sq in squares if is_expert), zero)
    if par.ep > 1:
        dist.all_reduce(local, group=par.ep_group)
    norm = (shared + local).sqrt()
    if norm.isfinite() and max_norm < float("inf"):
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm


# ---- statistics --------------------------------------------------------------------------------

def mean_over_ranks(values: dict[str, float], par: Parallel) -> dict[str, float]:
    """The mean of each value over all ranks (every rank must pass the same keys)."""
    if not par.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=par.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / par.world).tolist()))


def sum_over_ranks(stats: dict[str, dict[str, torch.Tensor]],
                   par: Parallel) -> dict[str, dict[str, torch.Tensor]]:
    """Routing statistics of all ranks added up (shapes may differ: a rank that has not seen a
    modality has fewer rows), as `moe.stats.collect` returns them."""
    if not par.enabled:
        return stats
    from moe.stats import RoutingStats

    everyone: list = [None] * par.world
    dist.all_gather_object(everyone, stats)
    merged: dict[str, RoutingStats] = {}
    for rank_stats in everyone:
        for layer, sums in rank_stats.items():
            merged.setdefault(layer, RoutingStats()).add(**sums)
    return {layer: s.read() for layer, s in merged.items()}


def sum_counts(counts: dict[str, int], par: Parallel) -> dict[str, int]:
    if not par.enabled or not counts:
        return counts
    keys = sorted(counts)
    t = torch.tensor([counts[k] for k in keys], dtype=torch.int64, device=par.device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def barrier(par: Parallel) -> None:
    if par.enabled:
        dist.barrier()


@torch.no_grad()
def sum_expert_load(model: nn.Module, par: Parallel) -> None:
    """Add up the load counters of the auxiliary-loss-free balancing over all ranks, so every
    rank moves its (replicated) expert biases the same way."""
    if not par.enabled:
        return
    from moe.moe import MoE

    for m in model.modules():
        if isinstance(m, MoE) and m.cfg.bias_balancing:
            dist.all_reduce(m.load)


# ---- local multi-process runs (tests, benchmarks) ----------------------------------------------

def spawn(fn, world: int, *args, timeout: float = 60.0, wait: float = 300.0,
          allow_failures: bool = False) -> list:
    """Run `fn(*args)` in `world` fresh gloo processes joined into one process group (collective
    timeout `timeout` seconds) and return each rank's result, rank order. A rank that raises
    fails the call with its traceback, unless `allow_failures` (then its result is the exception
    text, and ranks still alive after `wait` seconds are killed and read as None)."""
    import multiprocessing as mp
    import tempfile
    import time

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_spawned, args=(fn, rank, world, tmp, timeout, args))
                 for rank in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + wait
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for rank in range(world):
            path = os.path.join(tmp, f"{rank}.pt")
            result = torch.load(path, weights_only=False) if os.path.exists(path) else None
            if isinstance(result, _Raised) and not allow_failures:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{result.text}")
            if result is None and not allow_failures:
                raise RuntimeError(f"rank {rank} of {world} exited without a result "
                                   f"(exit code {procs[rank].exitcode})")
            results.append(result.text if isinstance(result, _Raised) else result)
        return results


class _Raised:
    def __init__(self, text: str):
        self.text = text


def _spawned(fn, rank: int, world: int, tmp: str, timeout: float, args) -> None:
    import traceback

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(*args)
    except BaseException:
        result = _Raised(traceback.format_exc())
    torch.save(result, os.path.join(tmp, f".{rank}.pt"))
    os.replace(os.path.join(tmp, f".{rank}.pt"), os.path.join(tmp, f"{rank}.pt"))
    if not isinstance(result, _Raised):
        dist.destroy_process_group()
