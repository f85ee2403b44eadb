"""Top-k dispatch and combine on the grouping primitive.

N tokens each choose k experts: S = N*k slots. The slots are grouped by expert (dropped slots
form one extra group at the end that is never computed), token rows are gathered into that order,
the experts run as grouped GEMMs, and the results come back as

    y[t] = sum_j weight[t, j] * expert_out[slot (t, j)]     (0 for a dropped slot)

Measured on CPU, the cheapest exact pieces are: an `index_select` gather (whose backward is an
`index_add`), and a combine that scales rows in expert order and `index_add`s them into the
tokens, with a hand-written backward that gathers the output gradient once and reuses it for
both the rows and the weights (`_Combine`).
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
        self.slot = self.grouping.order[:self.kept]  # flat (t * k + j) slot of each row
        self.token = self.slot // self.k  # token of each computed row
        self.dropped = self.N * self.k - self.kept

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (kept, D): one row per computed slot, grouped by expert."""
        return x.index_select(0, self.token)

    def combine(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """y (kept, D) expert outputs, weight (N, k) -> (N, D) weighted sums per token."""
        w = weight.reshape(-1).index_select(0, self.slot)  # (kept,) in expert order
        return _Combine.apply(y, w, self.token, self.N)


class _Combine(torch.autograd.Function):
    """out[token[s]] += w[s] * y[s]. Backward: rows = grad_out[token] once, then
    grad_w = <rows, y> (float32) and grad_y = w * rows (in place)."""

    @staticmethod
    def forward(ctx, y, w, token, N):
        ctx.save_for_backward(y, w, token)
        out = y.new_zeros(N, y.shape[1])
        return out.index_add_(0, token, y * w[:, None].to(y.dtype))

    @staticmethod
    def backward(ctx, grad):
        y, w, token = ctx.saved_tensors
        rows = grad.index_select(0, token)  # (kept, D)
        grad_w = (rows * y).sum(dim=-1, dtype=torch.float32).to(w.dtype) \
            if ctx.needs_input_grad[1] else None
        grad_y = rows.mul_(w[:, None].to(rows.dtype)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None
