"""Sparse block kinds of the backbone: MoE, MoMa (modality expert groups) and MoT with MoE.

    layers: moe        blocks: {moe: {num_experts: 8, top_k: 2}}
    layers: moma       blocks: {moma: {num_experts: 8, experts_per_modality: [4, 4]}}
    layers: mot_moe    blocks: {mot_moe: {untie: all, moe_modalities: [text],
                                          moe: {num_experts: 4, top_k: 1}}}

The MoE block itself lives in `moe` (usable without this package); these configs only fill in
the model's width and register the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn as nn

from moe.config import MoEConfig
from moe.grouping import as_grouping
from moe.layers import SwiGLU
from moe.moe import MoE
from moe.stats import RoutingStats
from mot.blocks import BlockConfig, register_block
from mot.config import check
from mot.mot import MoTConfig


def _moe_params(cfg: MoEConfig, dim: int, hidden: int) -> tuple[int, int, int]:
    """(total params, active params per token, forward matmul FLOPs per token) of an MoE FFN."""
    E, k = cfg.num_experts, cfg.top_k
    expert = 3 * dim * hidden
    shared = cfg.shared_experts * 3 * dim * (cfg.shared_hidden or hidden)
    gate = dim if cfg.shared_experts and cfg.shared_gate else 0
    router = dim * E
    slots = k if cfg.router == "topk" else (cfg.capacity_factor or 1.0) * k
    flops = 2 * (slots * expert + router + shared + gate)
    return E * expert + shared + gate + router, k * expert + shared + gate + router, flops


@register_block("moe")
@dataclass
class MoEBlockConfig(MoEConfig, BlockConfig):
    """A sparse MoE FFN (all options of `moe.MoEConfig`); width and hidden from the model."""

    def sized(self, model) -> MoEConfig:
        return MoEConfig(**{f.name: getattr(self, f.name) for f in fields(MoEConfig)}
                         | {"dim": model.dim, "hidden": self.hidden or model.ffn_hidden})

    def validate_for(self, model) -> None:
        if self.experts_per_modality:
            check(len(self.experts_per_modality) == model.num_modalities,
                  f"blocks.{self.kind}.experts_per_modality ({self.experts_per_modality}) needs "
                  f"one entry per modality ({model.modality_names})")

    def build_ffn(self, model) -> nn.Module:
        return MoE(self.sized(model))

    def ffn_params(self, model) -> tuple[int, int]:
        total, active, _ = _moe_params(self, model.dim, self.hidden or model.ffn_hidden)
        return total, active

    def ffn_flops(self, model) -> float:
        return _moe_params(self, model.dim, self.hidden or model.ffn_hidden)[2]


@register_block("moma")
@dataclass
class MoMaConfig(MoEBlockConfig):
    """MoMa (Lin et al. 2024): experts split into one group per modality; each token is routed
    among its own modality's experts. `experts_per_modality` defaults to an even split."""

    def validate_for(self, model) -> None:
        if not self.experts_per_modality:
            M = model.num_modalities
            check(self.num_experts % M == 0,
                  f"blocks.moma.num_experts ({self.num_experts}) must divide evenly over "
                  f"{M} modalities, or set blocks.moma.experts_per_modality")
            self.experts_per_modality = [self.num_experts // M] * M
            self.__post_init__()  # re-check top_k against the group sizes
        super().validate_for(model)


class ModalityFFNs(nn.Module):
    """One FFN module per modality (any mix of MoE and dense), run on the rows of each modality.
    The MoT paper's hybrid: an MoE FFN for text, a single FFN for images."""

    modality_indexed = True

    def __init__(self, ffns: list[nn.Module]):
        super().__init__()
        self.ffns = nn.ModuleList(ffns)
        self.stats = RoutingStats()

    def forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        g = as_grouping(groups, len(self.ffns), x)
        self.stats.add(tokens=g.counts)
        return g.run_grouped(x, lambda rows: torch.cat(
            [ffn(rows[s:e]) for ffn, (s, e) in zip(self.ffns, g.spans)]))

    def group_slices(self):
        return [(p, m, slice(0, p.shape[0])) for m, ffn in enumerate(self.ffns)
                for p in ffn.parameters()]


@register_block("mot_moe")
@dataclass
class MoTMoEConfig(MoTConfig):
    """MoT whose FFN is an MoE for the modalities in `moe_modalities` (options in `moe`) and a
    dense SwiGLU for the others."""

    moe_modalities: list[str] = field(default_factory=lambda: ["text"])
    moe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.moe, (dict, MoEConfig)), "blocks.mot_moe.moe must be a mapping")
        if isinstance(self.moe, dict):
            names = {f.name for f in fields(MoEConfig)}  # dim (and hidden) come from the model
            unknown = sorted(set(self.moe) - names)
            check(not unknown, f"blocks.mot_moe.moe: unknown option(s) {unknown}; valid: "
                               f"{sorted(names)}")
            self.moe = MoEConfig(**self.moe)

    def validate_for(self, model) -> None:
        for name in self.moe_modalities:
            check(name in model.modality_names, f"blocks.mot_moe.moe_modalities: unknown "
                                                f"modality {name!r}; valid: {model.modality_names}")

    def moe_config(self, model) -> MoEConfig:
        return replace(self.moe, dim=model.dim, hidden=self.moe.hidden or self.hidden_dim(model))

    def build_ffn(self, model) -> nn.Module:
        return ModalityFFNs([MoE(self.moe_config(model)) if name in self.moe_modalities
                             else SwiGLU(model.dim, self.hidden_dim(model))
                             for name in model.modality_names])

    def _per_modality(self, model) -> list[tuple[int, int, float]]:
        dense = 3 * model.dim * self.hidden_dim(model)
        cfg = self.moe_config(model)
        return [_moe_params(cfg, model.dim, cfg.hidden) if name in self.moe_modalities
                else (dense, dense, 2 * dense) for name in model.modality_names]

    def ffn_params(self, model) -> tuple[int, int]:
        """Active: the mean over modalities of what one token of that modality uses."""
        rows = self._per_modality(model)
        return sum(r[0] for r in rows), round(sum(r[1] for r in rows) / len(rows))

    def ffn_flops(self, model) -> float:
        rows = self._per_modality(model)
        return sum(r[2] for r in rows) / len(rows)
