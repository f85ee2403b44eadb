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

    Weights are w13 (G, D, 2H), each group's gate and up weights side by side (`w1` and `w3` are
    its two halves, as views), and w2 (G, H, D): the gate and up products are one product, as in
    HF's `gate_up_proj` and Megatron's fused fc1. Records tokens per group in `self.stats`.
    """

    def __init__(self, num_groups: int, dim: int, hidden: int):
        super().__init__()
        self.num_groups, self.dim, self.hidden = num_groups, dim, hidden
        gate, up, down = (nn.init.normal_(torch.empty(num_groups, d_in, d_out), std=d_in ** -0.5)
                          for d_in, d_out in ((dim, hidden), (dim, hidden), (hidden, dim)))
        self.w13 = nn.Parameter(torch.cat([gate, up], dim=-1))
        self.w2 = nn.Parameter(down)
        self.stats = RoutingStats()
        self._register_load_state_dict_pre_hook(_join_gate_up)

    @property
    def w1(self) -> torch.Tensor:
        """The gate weights (G, D, H): a view of w13's first half (writes reach w13)."""
        return self.w13[..., :self.hidden]

    @property
    def w3(self) -> torch.Tensor:
        """The up weights (G, D, H): a view of w13's second half."""
        return self.w13[..., self.hidden:]

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
        y = cpu_gemm.grouped_swiglu(x, self.w13, self.w2, offsets)  # one op on CPU
        if y is not None:
            return y
        # the gate's backward hands the product a fresh, contiguous gradient
        gate_up = grouped_linear(x, self.w13, offsets, contiguous_grad=True)  # (N, 2H)
        return grouped_linear(fused.swiglu_halves(gate_up), self.w2, offsets)  # (N, D)

    def ffn_padded(self, x: torch.Tensor) -> torch.Tensor:
        """x (G, C, D): C rows per group (zeros where a group has fewer) -> (G, C, D), as one
        batched matmul per weight. Equals `ffn` on the groups' real rows."""
        return torch.bmm(fused.swiglu_halves(torch.bmm(x, self.w13)), self.w2)  # (G, C, H) h

    def group_slices(self):
        return [(w, g, slice(g, g + 1)) for w in (self.w13, self.w2)
                for g in range(self.num_groups)]

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, dim={self.dim}, hidden={self.hidden}"


def _join_gate_up(state_dict, prefix, *args) -> None:
    """Load state dicts saved with separate `w1` and `w3` (G, D, H) into w13 (G, D, 2H)."""
    w1, w3 = state_dict.get(prefix + "w1"), state_dict.get(prefix + "w3")
    if w1 is not None and w3 is not None and prefix + "w13" not in state_dict:
        state_dict[prefix + "w13"] = torch.cat([state_dict.pop(prefix + "w1"),
                                                state_dict.pop(prefix + "w3")], dim=-1)
