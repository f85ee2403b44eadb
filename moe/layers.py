"""FFN layers: the dense SwiGLU, and layers with one weight per group run over grouped rows
(a grouped linear and a grouped SwiGLU).

Both take `(x, groups)` with x (..., D) and groups either the ids (...) or a precomputed
`Grouping`; they sort rows by group once, run grouped GEMMs, and restore sequence order. A
per-group loop (`grouped_linear_reference`) is the readable twin of the grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import cpu_gemm, fused
from moe.grouping import as_grouping, grouped_linear, grouped_linear_reference
from moe.stats import RoutingStats


class SwiGLU(nn.Module):
    """The dense FFN: `w2(silu(w1 x) * w3 x)`. A drop-in MLP: `ffn(x, modality=None) -> y`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        return self.w2(fused.swiglu(self.w1(x), self.w3(x)))


class GroupedLinear(nn.Module):
    """y = x @ weight[group(x)], weight (G, D_in, D_out), no bias."""

    def __init__(self, num_groups: int, d_in: int, d_out: int):
        super().__init__()
        self.num_groups, self.d_in, self.d_out = num_groups, d_in, d_out
        self.weight = nn.Parameter(torch.empty(num_groups, d_in, d_out))
        nn.init.normal_(self.weight, std=d_in ** -0.5)

    def forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        g = as_grouping(groups, self.num_groups, x)
        return g.run_grouped(x, lambda rows: grouped_linear(rows, self.weight, g.offsets))

    def group_slices(self):
        """(parameter, group, rows) triples: the rows of `parameter` that each group owns."""
        return [(self.weight, g, slice(g, g + 1)) for g in range(self.num_groups)]

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, d_in={self.d_in}, d_out={self.d_out}"


class GroupedSwiGLU(nn.Module):
    """One SwiGLU FFN per group: `w2[g](silu(w1[g] x) * w3[g] x)`.

    Weights are w1, w3 (G, D, H) and w2 (G, H, D). Records tokens per group in `self.stats`.
    """

    def __init__(self, num_groups: int, dim: int, hidden: int):
        super().__init__()
        self.num_groups, self.dim, self.hidden = num_groups, dim, hidden
        self.w1 = nn.Parameter(torch.empty(num_groups, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_groups, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_groups, hidden, dim))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=w.shape[1] ** -0.5)
        self.stats = RoutingStats()

    def forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        g = as_grouping(groups, self.num_groups, x)
        self.stats.add(tokens=g.counts)
        return g.run_grouped(x, lambda rows: self.ffn(rows, g.offsets))

    def ffn(self, x: torch.Tensor, offsets: torch.Tensor, reference: bool = False):
        """x (N, D) rows grouped by id, offsets (G,) group ends -> (N, D). Rows past the last
        offset are not computed. `reference` runs the per-group loop instead of grouped GEMMs."""
        if reference:
            gate = grouped_linear_reference(x, self.w1, offsets)
            up = grouped_linear_reference(x, self.w3, offsets)
            return grouped_linear_reference(F.silu(gate) * up, self.w2, offsets)
        y = cpu_gemm.grouped_swiglu(x, self.w1, self.w3, self.w2, offsets)  # one op on CPU
        if y is not None:
            return y
        # the gate's backward hands the first two products fresh, contiguous gradients
        gate = grouped_linear(x, self.w1, offsets, contiguous_grad=True)  # (N, H)
        up = grouped_linear(x, self.w3, offsets, contiguous_grad=True)
        return grouped_linear(fused.swiglu(gate, up), self.w2, offsets)  # (N, D)

    def ffn_padded(self, x: torch.Tensor) -> torch.Tensor:
        """x (G, C, D): C rows per group (zeros where a group has fewer) -> (G, C, D), as one
        batched matmul per weight. Equals `ffn` on the groups' real rows."""
        h = fused.swiglu(torch.bmm(x, self.w1), torch.bmm(x, self.w3))  # (G, C, H)
        return torch.bmm(h, self.w2)

    def group_slices(self):
        return [(w, g, slice(g, g + 1)) for w in (self.w1, self.w3, self.w2)
                for g in range(self.num_groups)]

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, dim={self.dim}, hidden={self.hidden}"
