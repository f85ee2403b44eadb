"""The compiled kernels of the grouping primitive (`csrc/`), their PyTorch references, and the
`torch.library` fake kernels (for `torch.compile`) shared by all devices; their autograd is
registered in C++ (`csrc/autograd.cpp`), once for every device.

Vocabulary: N tokens each choose k groups, S = N * k slots, slot s = t * k + j. `sort_by_group`
orders the slots by group (stably, in a given priority order) and drops those past `capacity`;
`order` (S,) lists the slots row by row (the first `kept` rows are kept), `inverse` (S,) gives
each slot's row, `counts` (G,) the kept rows per group.

    permute_rows(x, order, inverse, w, k, kept)[row]   = x[order[row] // k] * w[order[row]]
    unpermute_rows(y, order, inverse, w, k, kept)[t]   = sum_j w[t*k+j] * y[inverse[t*k+j]]
    slot_dots(a, b, order, inverse, k, kept)[s]        = <a[s // k], b[inverse[s]]>
(rows at or past `kept` count as zero; w is optional). Each is the other's backward;
`unpermute_rows_backward` computes the weighted unpermute's two gradients (rows and weights) in
one pass.

`pad_groups` turns that layout into a padded one: every group owns the same number of rows C
(row g * C + rank), so the experts run as one batched matmul over (G, C, D). Its `order` has
G * C rows and -1 for the padding rows, which the three ops read as zeros, like dropped rows.

`permute_rows` etc. below run the compiled op when `moe._C` was built for the tensor's device,
else the reference; without the extension a one-line notice says so once.
"""

from __future__ import annotations

import sys

import torch

try:
    from moe import _C  # noqa: F401  (loading it registers torch.ops.moe_ops)

    AVAILABLE = True
except ImportError:
    AVAILABLE = False
    print("moe: compiled kernels not built (csrc/); running the PyTorch references "
          "(reinstall with `pip install --no-build-isolation -e .` to build them)",
          file=sys.stderr)


# ---- references: the readable definitions, used when no kernel is built --------------------

def sort_by_group_reference(ids: torch.Tensor, priority: torch.Tensor, num_groups: int,
                            capacity: int):
    S = ids.numel()
    arange = torch.arange(S, device=ids.device)
    queue = priority if priority.numel() else arange
    queued_ids = ids[queue]
    by_group = torch.argsort(queued_ids, stable=True)
    seen = torch.bincount(ids, minlength=num_groups)
    starts = torch.cumsum(seen, 0) - seen
    rank = torch.empty_like(ids)
    rank[queue[by_group]] = arange - starts[queued_ids[by_group]]
    kept = rank < capacity if capacity >= 0 else torch.ones_like(ids, dtype=torch.bool)
    counts = seen.clamp(max=capacity) if capacity >= 0 else seen
    start = torch.cumsum(counts, 0) - counts
    dropped_before = torch.cumsum(~kept, 0) - (~kept).long()
    inverse = torch.where(kept, start[ids] + rank, counts.sum() + dropped_before)
    order = torch.empty_like(ids)
    order[inverse] = arange
    return order, inverse, counts


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type of the kernels: float64 for float64, else float32."""
    return torch.promote_types(dtype, torch.float32)


def _weighted(rows: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return rows if w is None else (rows.to(_acc(rows.dtype)) * w[:, None]).to(rows.dtype)


def permute_rows_reference(x, order, inverse, weights, k: int, kept: int):
    slot = order[:kept]
    real = slot >= 0  # padding rows (-1) hold zeros
    if not bool(real.any()):  # also covers x without rows
        rows = x.new_zeros(kept, x.shape[1])
    else:
        slot = slot.clamp(min=0)
        rows = _weighted(x.index_select(0, slot // k),
                         None if weights is None else weights[slot])
        if not bool(real.all()):
            rows = torch.where(real[:, None], rows, rows.new_zeros(()))
    return torch.cat([rows, rows.new_zeros(order.numel() - kept, x.shape[1])])


def unpermute_rows_reference(y, order, inverse, weights, k: int, kept: int):
    S = inverse.numel()
    valid = inverse < kept
    rows = y[:kept].index_select(0, torch.where(valid, inverse, 0)) if kept else \
        y.new_zeros(S, y.shape[1])
    rows = rows.to(_acc(y.dtype)) * valid[:, None]
    if weights is not None:
        rows = rows * weights[:, None]
    return rows.view(S // k, k, y.shape[1]).sum(dim=1).to(y.dtype)


def slot_dots_reference(a, b, order, inverse, k: int, kept: int):
    S = inverse.numel()
    valid = inverse < kept
    rows = b[:kept].index_select(0, torch.where(valid, inverse, 0)) if kept else \
        b.new_zeros(S, b.shape[1])
    tokens = torch.arange(S, device=a.device) // k
    acc = _acc(a.dtype)
    dots = (a.index_select(0, tokens).to(acc) * rows.to(acc)).sum(dim=-1) * valid
    return dots.float()


# ---- fake kernels, once for every device ----------------------------------------------------

if AVAILABLE:
    ops = torch.ops.moe_ops

    @torch.library.register_fake("moe_ops::sort_by_group")
    def _(ids, priority, num_groups, capacity):
        return torch.empty_like(ids), torch.empty_like(ids), ids.new_empty(num_groups)

    @torch.library.register_fake("moe_ops::permute_rows")
    def _(x, order, inverse, weights, k, kept):
        return x.new_empty(order.shape[0], x.shape[1])

    @torch.library.register_fake("moe_ops::unpermute_rows")
    def _(y, order, inverse, weights, k, kept):
        return y.new_empty(inverse.shape[0] // k, y.shape[1])

    @torch.library.register_fake("moe_ops::slot_dots")
    def _(a, b, order, inverse, k, kept):
        return a.new_empty(inverse.shape[0], dtype=torch.float32)

    @torch.library.register_fake("moe_ops::unpermute_rows_backward")
    def _(grad, y, order, inverse, weights, k, kept):
        return torch.empty_like(y), grad.new_empty(inverse.shape[0], dtype=torch.float32)

    # the grouped products of moe.cpu_gemm (CPU only; `group_mm` and `grouped_swiglu`, their
    # differentiable compositions, have a kernel for every key in csrc/autograd.cpp)
    @torch.library.register_fake("moe_ops::group_rows_mm")
    def _(a, b, ends, spread, block=64):
        return a.new_empty(a.shape[0], b.shape[2])

    @torch.library.register_fake("moe_ops::group_inner_mm")
    def _(a, b, ends, spread, block=64):
        return a.new_empty(len(ends), a.shape[1], b.shape[1])

    @torch.library.register_fake("moe_ops::grouped_swiglu_forward")
    def _(x, w13, w2, ends, block=0):
        return x.new_empty(x.shape[0], w2.shape[2]), x.new_empty(x.shape[0], w13.shape[2])

    @torch.library.register_fake("moe_ops::grouped_swiglu_backward")
    def _(grad, x, w13, w2, gate_up, ends, needs, block=0):
        return tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                     for t, need in zip((x, w13, w2), needs))

    @torch.library.register_fake("moe_ops::routed_swiglu_forward")
    def _(x, w13, w2, order, inverse, weights, ends, k, block=0):
        kept = ends[-1] if ends else 0
        return x.new_empty(x.shape[0], w2.shape[2]), x.new_empty(kept, w13.shape[2])

    @torch.library.register_fake("moe_ops::routed_swiglu_backward")
    def _(grad, x, w13, w2, gate_up, order, inverse, weights, ends, k, needs, block=0):
        return tuple(t.new_empty(t.shape) if need else t.new_empty(0)
                     for t, need in zip((x, weights, w13, w2), needs))


def _compiled(t: torch.Tensor) -> bool:
    if not AVAILABLE:
        return False
    if t.device.type == "cpu":
        return True
    return t.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "moe_ops::permute_rows", "CUDA")


def _contiguous(w):
    return None if w is None else w.contiguous()


def sort_by_group(ids: torch.Tensor, num_groups: int, priority: torch.Tensor | None = None,
                  capacity: int | None = None):
    """ids (S,) int64 -> order (S,), inverse (S,), counts (G,)."""
    ids = ids.reshape(-1).long().contiguous()
    priority = ids.new_empty(0) if priority is None else priority.long().contiguous()
    capacity = -1 if capacity is None else int(capacity)
    if _compiled(ids):
        return ops.sort_by_group(ids, priority, num_groups, capacity)
    return sort_by_group_reference(ids, priority, num_groups, capacity)


def pad_groups(order: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, rows: int):
    """The layout of `sort_by_group` (kept rows of group g at its start + rank) -> the padded
    layout with `rows` (>= every count) rows per group: group g's rows at g * rows + rank.
    Returns order (G * rows,) with -1 for padding rows, and inverse (S,) (dropped slots past
    all rows); kept = G * rows."""
    G = counts.numel()
    if G and int(counts.max()) > rows:
        raise ValueError(f"rows per group ({rows}) must hold the largest group "
                         f"({int(counts.max())})")
    kept = int(counts.sum())
    ends = counts.cumsum(0)
    shift = torch.arange(G, device=counts.device) * rows - (ends - counts)  # (G,) start moves
    group = torch.repeat_interleave(torch.arange(G, device=counts.device), counts,
                                    output_size=kept)  # (kept,) the group of each kept row
    moved = torch.arange(kept, device=counts.device) + shift[group]  # (kept,) padded rows
    padded_order = order.new_full((G * rows,), -1)
    padded_order[moved] = order[:kept]
    padded_inverse = inverse + (G * rows - kept)  # dropped slots stay past every row
    padded_inverse[order[:kept]] = moved
    return padded_order, padded_inverse


def permute_rows(x, order, inverse, weights=None, k: int = 1, kept: int | None = None):
    kept = order.numel() if kept is None else kept
    if _compiled(x):
        return ops.permute_rows(x.contiguous(), order, inverse, _contiguous(weights), k, kept)
    return permute_rows_reference(x, order, inverse, weights, k, kept)


def unpermute_rows(y, order, inverse, weights=None, k: int = 1, kept: int | None = None):
    kept = order.numel() if kept is None else kept
    if _compiled(y):
        return ops.unpermute_rows(y.contiguous(), order, inverse, _contiguous(weights), k, kept)
    return unpermute_rows_reference(y, order, inverse, weights, k, kept)
