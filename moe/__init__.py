"""Sparse and modality-routed blocks on one grouping primitive; usable without `mot`."""

from moe.config import MoEConfig
from moe.grouping import Grouping, grouped_linear, grouped_linear_reference
from moe.layers import GroupedLinear, GroupedSwiGLU, SwiGLU
from moe.moe import MoE, update_biases
from moe.stats import RoutingStats, collect

__all__ = ["Grouping", "GroupedLinear", "GroupedSwiGLU", "MoE", "MoEConfig", "RoutingStats",
           "SwiGLU", "collect", "grouped_linear", "grouped_linear_reference", "update_biases"]
