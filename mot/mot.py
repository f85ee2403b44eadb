"""Mixture-of-Transformers (Liang et al. 2024): parameters untied by modality, attention global.

Each modality has its own copy of the untied parts; tokens are grouped by modality once per
forward (`moe.Grouping`, shared by every layer), each group runs its own weights as one grouped
GEMM, and one self-attention runs over the whole interleaved sequence. `untie` follows the
paper's ablation:

    "ffn"       the FFN only (most of the gain in the paper)
    "ffn+attn"  also Q/K/V/O projections and the QK-norms
    "all"       also the layer norms: every non-embedding parameter (the paper's MoT)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import fused
from moe.grouping import Grouping, check_ids, row_ids
from moe.layers import GroupedLinear, GroupedSwiGLU
from mot.blocks import BlockConfig, register_block
from mot.config import check, check_positive
from mot.layers import Linear, RMSNorm

UNTIE_LEVELS = ("ffn", "ffn+attn", "all")


class GroupedRMSNorm(nn.Module):
    """RMSNorm with one weight vector per group: weight (G, dim), chosen per token."""

    is_norm = True

    def __init__(self, num_groups: int, dim: int, eps: float):
        super().__init__()
        self.num_groups, self.dim, self.eps = num_groups, dim, eps
        self.weight = nn.Parameter(torch.ones(num_groups, dim))

    def forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        ids = row_ids(groups, self.num_groups, x)
        if isinstance(groups, Grouping) and groups.grouped:
            # rows sorted by group (x is (N, [heads,] dim)): one fused pass, each run of rows
            # with its group's weight, no per-row weights
            per_token = math.prod(x.shape[1:-1])
            return fused.rms_norm(x, self.weight, self.eps,
                                  [(e - s) * per_token for s, e in groups.spans])
        # x is (*ids.shape, [heads,] dim): broadcast the per-token weight over any middle dims
        weight = self.weight[ids].view(*ids.shape, *[1] * (x.dim() - ids.dim() - 1), self.dim)
        return F.rms_norm(x, (self.dim,), eps=self.eps) * weight

    def head_norm_args(self, groups, dtype: torch.dtype):
        """(weight, eps, group ids) for `moe.fused.qkv_heads`: the weight rows, and the group of
        every position in sequence order."""
        ids = groups.ids if isinstance(groups, Grouping) else check_ids(groups, self.num_groups)
        return self.weight, self.eps, ids.reshape(-1)

    def group_slices(self):
        return [(self.weight, g, slice(g, g + 1)) for g in range(self.num_groups)]


def modality_indexed(module: nn.Module) -> nn.Module:
    """Mark a grouped module whose groups are modalities (what freezing by modality looks for)."""
    module.modality_indexed = True
    return module


@register_block("mot")
@dataclass
class MoTConfig(BlockConfig):
    """A Mixture-of-Transformers layer. `hidden` overrides the model's `ffn_hidden`."""

    untie: str = "all"
    hidden: int | None = None

    needs_grouping = True

    def __post_init__(self):
        check(self.untie in UNTIE_LEVELS,
              f"blocks.mot.untie ({self.untie!r}) must be one of {list(UNTIE_LEVELS)}")
        if self.hidden is not None:
            check_positive("blocks.mot.hidden", self.hidden)

    def unties(self, part: str) -> bool:
        """part: "ffn", "attn" (Q/K/V/O), "qk_norm" or "norm" (the layer norms)."""
        if part in ("attn", "qk_norm"):
            return self.untie in ("ffn+attn", "all")
        if part == "norm":
            return self.untie == "all"
        return True

    def hidden_dim(self, model) -> int:
        return self.hidden or model.ffn_hidden

    def build_ffn(self, model) -> nn.Module:
        return modality_indexed(GroupedSwiGLU(model.num_modalities, model.dim,
                                              self.hidden_dim(model)))

    def build_linear(self, model, part, d_in, d_out) -> nn.Module:
        if self.unties(part):
            return modality_indexed(GroupedLinear(model.num_modalities, d_in, d_out))
        return Linear(d_in, d_out)

    def build_norm(self, model, part, dim) -> nn.Module:
        if self.unties(part):
            return modality_indexed(GroupedRMSNorm(model.num_modalities, dim, model.norm_eps))
        return RMSNorm(dim, eps=model.norm_eps)

    def copies(self, model, part) -> int:
        return model.num_modalities if self.unties(part) else 1

    def ffn_params(self, model) -> tuple[int, int]:
        n = 3 * model.dim * self.hidden_dim(model)
        return model.num_modalities * n, n

    def ffn_flops(self, model) -> int:
        return 2 * 3 * model.dim * self.hidden_dim(model)
