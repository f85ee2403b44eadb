"""Distributed checkpoints (`torch.distributed.checkpoint`) that reshard across expert-parallel
sizes: save under EP 2, load under EP 1 or 4, bit for bit.

Every MoE block's expert weights (and their AdamW moments) are stored one entry per *global*
expert, `model.<block>.experts.w13.<e>`, so a checkpoint does not depend on how the experts were
sharded: each rank writes the experts it holds and reads the experts it will hold. Replicated
tensors are written once. A single process (no process group) reads and writes the same format.

Atomic: all ranks write into a hidden `.step_XXXXXXX.dcp.tmp` folder; after every rank has
finished, rank 0 adds `meta.pt` (step, history, config, data RNG) and renames the folder to
`step_XXXXXXX.dcp`. A crash at any point leaves either no new checkpoint or a complete one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from experiments.checkpoint import atomic_torch_save
from moe.moe import MoE


def _expert_slices(model: nn.Module) -> dict[int, int]:
    """id(expert parameter) -> the global index of its first expert."""
    out = {}
    for m in model.modules():
        if isinstance(m, MoE):
            first = m.dispatcher.first if m.dispatcher is not None else 0
            for p in m.experts.parameters():
                out[id(p)] = first
    return out


def flat_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> dict[str, torch.Tensor]:
    """{key: tensor view} of the model (and optimizer moments), expert tensors split per global
    expert. The views share storage with the live tensors, so `dcp.load` into them restores the
    model in place."""
    experts = _expert_slices(model)
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor, first: int | None) -> None:
        t = t.detach()
        if first is None:
            out[key] = t
        else:
            for i in range(t.shape[0]):
                out[f"{key}.{first + i}"] = t[i]

    names = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names[id(t)] = name
        put(f"model.{name}", t, experts.get(id(t)))
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    split = experts.get(id(p)) if value.shape == p.shape else None
                    put(f"optim.{names[id(p)]}.{key}", value, split)
    return out


def materialize_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors (AdamW builds them lazily at its first step) without
    changing any parameter: one step with zero gradients and learning rate 0."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    saved = [(g["lr"], g.get("weight_decay")) for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, (lr, _) in zip(optimizer.param_groups, saved):
        g["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


def save(folder: str | Path, model: nn.Module, optimizer, meta: dict, rank: int = 0) -> Path:
    """Write a checkpoint folder atomically (collective: every rank calls it)."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    distributed = dist.is_initialized()
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # the remains of a save that crashed
    if distributed:
        dist.barrier()
    with _single_process_is_intended():
        dcp.save(flat_state(model, optimizer), checkpoint_id=str(tmp))
    torch.save(torch.get_rng_state(), tmp / f"rng_{rank}.pt")
    if distributed:
        dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        atomic_torch_save(meta, tmp / "meta.pt")
        _fsync_tree(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    if distributed:
        dist.barrier()
    return folder


def is_complete(folder: Path) -> bool:
    return (folder / "meta.pt").is_file() and (folder / ".metadata").is_file()


def load(folder: str | Path, model: nn.Module, optimizer=None, rank: int = 0,
         world: int = 1) -> dict:
    """Load a checkpoint folder into `model` (sharded or not) and `optimizer` in place; returns
    its meta. This rank's torch RNG is restored when the checkpoint had the same world size."""
    folder = Path(folder)
    if optimizer is not None:
        materialize_optimizer(optimizer)
    state = flat_state(model, optimizer)
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(folder))
    meta = read_meta(folder)
    rng = folder / f"rng_{rank}.pt"
    if meta.get("world", 1) == world and rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return meta


def read_meta(folder: str | Path) -> dict:
    return torch.load(Path(folder) / "meta.pt", map_location="cpu", weights_only=False)


@torch.no_grad()
def load_unsharded(state: dict, model: nn.Module, optimizer=None) -> None:
    """Load a single-process checkpoint ({"model": state_dict, "optimizer": state_dict}) into a
    model whose experts may be sharded: each shard takes its slice of every expert tensor."""
    experts = _expert_slices(model)

    def part(value: torch.Tensor, like: torch.Tensor, p) -> torch.Tensor:
        if id(p) in experts and value.shape != like.shape:
            return value[experts[id(p)]:experts[id(p)] + like.shape[0]]
        return value

    for name, t in model.state_dict(keep_vars=True).items():
        t.copy_(part(state["model"][name], t, t))
    if optimizer is None:
        return
    materialize_optimizer(optimizer)
    saved = state["optimizer"]["state"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, value in saved.get(i, {}).items():
            target = optimizer.state[p][key]
            target.copy_(part(value, target, p))


@contextlib.contextmanager
def _single_process_is_intended():
    """Without a process group DCP reads and writes as one process, which is what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)
