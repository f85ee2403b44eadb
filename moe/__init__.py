"""Sparse and modality-routed blocks on one grouping primitive; usable without `mot`."""

from moe.grouping import Grouping, grouped_linear, grouped_linear_reference
from moe.layers import GroupedLinear, GroupedSwiGLU
from moe.stats import RoutingStats, collect

__all__ = ["Grouping", "GroupedLinear", "GroupedSwiGLU", "RoutingStats", "collect",
           "grouped_linear", "grouped_linear_reference"]
