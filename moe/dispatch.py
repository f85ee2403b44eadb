"""Top-k dispatch and combine on the grouping primitive.

N tokens each choose k experts: S = N*k slots. `moe.ops.sort_by_group` orders the slots by expert
(stably, in a priority order) and drops those past the capacity; token rows are permuted into that
order, the experts run as grouped GEMMs on the first `kept` rows, and the results come back as

    y[t] = sum_j weight[t, j] * expert_out[slot (t, j)]     (0 for a dropped slot)

Permute and combine are the compiled kernels of `csrc/` where built (one pass each, the combine
weights fused into the unpermute; each is the other's backward), else their PyTorch references.

`padded=True` gives every expert the same number of rows C (the capacity, or the largest group
rounded up to `pad_multiple`), zeros below each group's rows, so the experts run as one batched
matmul over (E, C, D): one call instead of one product per expert, at the price of the padding
rows' FLOPs, which an uneven load makes large (see README, Mixture-of-Experts).
"""

from __future__ import annotations

import torch

from moe import ops


def priority_order(expert: torch.Tensor, weight: torch.Tensor, policy: str) -> torch.Tensor:
    """The queue in which slots claim capacity, as a permutation of the N*k slots.
    "position": all first choices before any second choice, earlier tokens first (GShard);
    "probability": highest router weight first, ties in slot order."""
    N, k = expert.shape
    if policy == "probability":
        return torch.argsort(weight.reshape(-1), descending=True, stable=True)
    return torch.arange(N * k, device=expert.device).view(N, k).t().reshape(-1)


class TopKDispatch:
    """expert (N, k) chosen experts; capacity slots per expert (None: dropless), claimed in
    `priority` order (a permutation of the slots; None: slot order). `padded`: every expert
    gets `rows_per_expert` rows (gather gives (E * rows_per_expert, D)): the capacity, or
    dropless the largest group rounded up to `pad_multiple` (64 keeps the shapes oneDNN meets in
    half precision on CPU few, as `moe.cpu_gemm` does)."""

    def __init__(self, expert: torch.Tensor, num_experts: int, capacity: int | None = None,
                 priority: torch.Tensor | None = None, padded: bool = False,
                 pad_multiple: int = 8):
        self.N, self.k = expert.shape
        self.order, self.inverse, self.counts = ops.sort_by_group(
            expert.reshape(-1), num_experts, priority, capacity)
        self.offsets = self.counts.cumsum(0).to(torch.int32)  # kept slots per expert, ends
        self.kept = int(self.offsets[-1]) if num_experts else 0
        self.dropped = self.N * self.k - self.kept
        self.rows_per_expert = None
        if padded:
            largest = int(self.counts.max()) if num_experts else 0
            rows = capacity if capacity is not None else \
                -(-largest // pad_multiple) * pad_multiple
            self.order, self.inverse = ops.pad_groups(self.order, self.inverse, self.counts,
                                                      rows)
            self.rows_per_expert, self.kept = rows, num_experts * rows

    @property
    def keep(self) -> torch.Tensor:
        """(N, k) bool: which routing slots were computed."""
        return (self.inverse < self.kept).view(self.N, self.k)

    @property
    def token(self) -> torch.Tensor:
        """(kept,) the token of each computed row (-1 for padding rows)."""
        slot = self.order[:self.kept]
        return torch.where(slot >= 0, slot // self.k, -1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (kept, D): one row per computed slot, grouped by expert (padded: zero
        rows after each expert's)."""
        rows = ops.permute_rows(x, self.order, self.inverse, None, self.k, self.kept)
        # dropless: every row is kept, and a no-op slice would still cost its backward a
        # zero-filled full-size gradient
        return rows if self.kept == rows.shape[0] else rows[:self.kept]

    def combine(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """y (kept, D) expert outputs, weight (N, k) -> (N, D) weighted sums per token."""
        return ops.unpermute_rows(y, self.order, self.inverse, weight.reshape(-1).float(),
                                  self.k, self.kept)
