"""Top-k dispatch and combine on the grouping primitive.

N tokens each choose k experts: S = N*k slots. The slots are grouped by expert (dropped slots
form one extra group at the end that is never computed), token rows are gathered into that order,
the experts run as grouped GEMMs, and the results come back as

    y[t] = sum_j weight[t, j] * expert_out[slot (t, j)]     (0 for a dropped slot)

Both data movements have cheap exact backwards: the gather's gradient sums each token's k slots
(a gather and a sum, no scatter-add), and the combine is a permutation gather and a batched
(1 x k) @ (k x D) product.
"""

from __future__ import annotations

import torch

from moe.grouping import Grouping


class TopKDispatch:
    """expert (N, k) chosen experts; keep (N, k) bool or None (capacity drops)."""

    def __init__(self, expert: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None):
        self.N, self.k = expert.shape
        self.num_experts = num_experts
        ids = expert if keep is None else expert.masked_fill(~keep, num_experts)
        self.grouping = Grouping.from_ids(ids.reshape(-1), num_experts + 1)
        self.counts = self.grouping.counts[:num_experts]  # kept slots per expert
        self.offsets = self.grouping.offsets[:num_experts]
        self.kept = self.grouping.spans[num_experts - 1][1]  # slots [0, kept) are computed
        self.token = self.grouping.order[:self.kept] // self.k  # token of each computed slot
        self.dropped = self.N * self.k - self.kept

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (kept, D): one row per computed slot, grouped by expert."""
        return _Gather.apply(x, self)

    def combine(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """y (kept, D) expert outputs, weight (N, k) -> (N, D) weighted sums per token."""
        if self.dropped:
            y = torch.cat([y, y.new_zeros(self.dropped, y.shape[1])])
        slots = self.grouping.unpermute(y).view(self.N, self.k, y.shape[1])  # (N, k, D)
        return torch.bmm(weight.to(y.dtype).unsqueeze(1), slots).squeeze(1)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dispatch: TopKDispatch):
        ctx.dispatch = dispatch
        return x.index_select(0, dispatch.token)

    @staticmethod
    def backward(ctx, grad):
        d = ctx.dispatch
        if d.dropped:
            grad = torch.cat([grad, grad.new_zeros(d.dropped, grad.shape[1])])
        return d.grouping.unpermute(grad).view(d.N, d.k, grad.shape[1]).sum(dim=1), None
