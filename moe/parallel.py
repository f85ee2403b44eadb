"""Expert parallelism: shard every MoE block's experts over the ranks of a process group.

    shard_experts(model, ep_group)     # after building the model, before the optimizer

Each rank keeps `E / P` consecutive experts (rank r owns experts [r*E/P, (r+1)*E/P)) as a
`GroupedSwiGLU` of its own; routers, shared experts and everything else stay replicated. A block
still routes, caps and balances its own rank's tokens exactly as on one device, so P ranks equal P
single-device calls on the same inputs; only where the expert FFNs run changes.

Dispatch (`AllToAllDispatcher`), for the kept routing slots (token t, expert e, weight w):
  1. each (token, destination rank) pair is sent once, however many of that rank's experts the
     token chose: `all_to_all_single` with uneven splits (gloo and NCCL both support it with
     autograd; the list form with uneven sizes does not work on gloo);
  2. a small second exchange carries each slot's (pair, local expert, weight);
  3. the owner groups the received slots by local expert (the grouping primitive), runs its
     experts as grouped GEMMs, and sums each pair's weighted outputs;
  4. one row per pair goes back; the sender adds the rows of each token.
Payload bytes are therefore the minimum: 2 directions x off-rank (token, rank) pairs x D x
element size, counted in `dispatcher.bytes` (metadata separately, in `meta_bytes`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moe.grouping import Grouping
from moe.layers import GroupedSwiGLU
from moe.moe import MoE


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven row splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, counter):
        ctx.splits, ctx.group, ctx.counter = (out_splits, in_splits), group, counter
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        if ctx.counter is not None:
            ctx.counter.count_backward(grad, out_splits)
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
               counter=None) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows: send x[in_splits[r] block] to rank r, receive
    out_splits[r] rows from rank r (ranks in `group` order)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, counter)


class AllToAllDispatcher:
    """The expert-parallel path of one MoE block: slots in, combined token outputs back.

    bytes / backward_bytes: payload bytes this rank sent to other ranks (forward: tokens out and
    results back; backward: the gradients of both); meta_bytes: the counts and slot metadata.
    `min_bytes`: the analytic minimum of the forward payload, 2 x off-rank pairs x D x size."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.local = num_experts // self.size
        self.first = self.rank * self.local
        self.reset()

    def reset(self) -> None:
        self.bytes = self.backward_bytes = self.meta_bytes = self.min_bytes = 0

    def read(self, reset: bool = True) -> dict[str, int]:
        out = dict(bytes=self.bytes, backward_bytes=self.backward_bytes,
                   meta_bytes=self.meta_bytes, min_bytes=self.min_bytes)
        if reset:
            self.reset()
        return out

    def _off_rank(self, splits: list[int]) -> int:
        return sum(splits) - splits[self.rank]

    def count_backward(self, grad: torch.Tensor, out_splits: list[int]) -> None:
        if grad.dim() == 2 and grad.is_floating_point():
            self.backward_bytes += self._off_rank(out_splits) * grad.shape[1] * grad.element_size()

    def __call__(self, rows: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                 weight: torch.Tensor, experts: GroupedSwiGLU, reference: bool = False):
        """rows (N, D); token, expert, weight (S,) the kept slots -> (N, D) with
        y[t] = sum over slots of t: weight * expert_ffn(rows[t])."""
        N, D = rows.shape
        P, L = self.size, self.local
        # 1. one message row per (destination rank, token) pair, sorted by rank then token
        dest = expert // L
        pairs, pair_of_slot = torch.unique(dest * N + token, return_inverse=True)  # (R,), (S,)
        send = torch.bincount(pairs // N, minlength=P)  # (P,) pairs per destination
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_pairs, recv_pairs = send.tolist(), recv.tolist()
        # 2. slot metadata: the pair's index within its message, local expert, weight
        slot_order = torch.argsort(pair_of_slot, stable=True)
        slot_pair = pair_of_slot[slot_order]
        pair_start = torch.cumsum(send, 0) - send  # (P,) first pair of each message
        slot_dest = dest[slot_order]
        meta = torch.stack([slot_pair - pair_start[slot_dest], expert[slot_order] % L], 1)
        slots_send = torch.bincount(slot_dest, minlength=P)
        slots_recv = torch.empty_like(slots_send)
        dist.all_to_all_single(slots_recv, slots_send, group=self.group)
        s_send, s_recv = slots_send.tolist(), slots_recv.tolist()
        meta_in = torch.empty((sum(s_recv), 2), dtype=meta.dtype, device=meta.device)
        dist.all_to_all_single(meta_in, meta, s_recv, s_send, group=self.group)
        w_in = all_to_all(weight[slot_order].float(), s_recv, s_send, self.group)
        # 3. tokens to the experts' owners; group the received slots by local expert
        x_in = all_to_all(rows.index_select(0, pairs % N), recv_pairs, send_pairs, self.group,
                          self)  # (R_in, D)
        first_pair = torch.cumsum(recv, 0) - recv  # (P,) where each source's pairs begin
        source = torch.repeat_interleave(torch.arange(P, device=rows.device), slots_recv)
        pair_in = meta_in[:, 0] + first_pair[source]  # (S_in,) row of x_in for each slot
        g = Grouping.from_ids(meta_in[:, 1], L)
        h = experts.ffn(x_in.index_select(0, pair_in[g.order]), g.offsets, reference)
        h = h.float() * w_in[g.order, None]
        y_in = torch.zeros((len(x_in), D), dtype=torch.float32, device=rows.device)
        y_in = y_in.index_add(0, pair_in[g.order], h).to(rows.dtype)  # (R_in, D)
        # 4. one row per pair back to the sender, summed per token
        y_pairs = all_to_all(y_in, send_pairs, recv_pairs, self.group, self)  # (R, D)
        y = torch.zeros((N, D), dtype=torch.float32, device=rows.device)
        y = y.index_add(0, pairs % N, y_pairs.float()).to(rows.dtype)
        size = rows.element_size()
        self.bytes += (self._off_rank(send_pairs) + self._off_rank(recv_pairs)) * D * size
        self.min_bytes += 2 * self._off_rank(send_pairs) * D * size
        self.meta_bytes += 2 * (P - 1) * 8 + self._off_rank(s_send) * (16 + 4)
        return y


def shard_experts(model: nn.Module, group=None) -> list[MoE]:
    """Shard the experts of every MoE block of `model` over the ranks of `group` (default: the
    whole world) in place; returns the sharded blocks. Call it on a freshly built (or loaded)
    model on every rank, before building the optimizer: each rank keeps its slice of the weights.
    """
    if not dist.is_initialized():
        raise ValueError("shard_experts needs an initialised torch.distributed process group")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    for block in blocks:
        cfg = block.cfg
        if cfg.num_experts % size:
            raise ValueError(f"moe.num_experts ({cfg.num_experts}) must be divisible by the "
                             f"expert-parallel size ({size})")
        if block.megablocks is not None:
            raise ValueError("moe.implementation 'megablocks' brings its own expert parallelism; "
                             "use 'grouped' or 'loop' with shard_experts")
        if block.dispatcher is not None:
            raise ValueError("shard_experts: the model's experts are already sharded")
        full, local = block.experts, cfg.num_experts // size
        shard = GroupedSwiGLU(local, full.dim, full.hidden).to(full.w2.device, full.w2.dtype)
        with torch.no_grad():
            for name in ("w13", "w2"):
                getattr(shard, name).copy_(getattr(full, name)[rank * local:(rank + 1) * local])
                getattr(shard, name).requires_grad_(getattr(full, name).requires_grad)
        block.experts = shard
        block.dispatcher = AllToAllDispatcher(group, cfg.num_experts)
    return blocks


def is_expert_parameter(model: nn.Module):
    """The parameters of `model` that are expert shards (reduced over data-parallel replicas
    only), as a set of ids."""
    return {id(p) for m in model.modules() if isinstance(m, MoE) and m.dispatcher is not None
            for p in m.experts.parameters()}


def communication(model: nn.Module, reset: bool = True) -> dict[str, int]:
    """This rank's dispatcher byte counts summed over all sharded blocks since the last read."""
    total: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, MoE) and m.dispatcher is not None:
            for key, value in m.dispatcher.read(reset).items():
                total[key] = total.get(key, 0) + value
    return total
