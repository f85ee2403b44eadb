"""Routing statistics: counters a block accumulates until the trainer reads and resets them.

Nothing is global: each routed block owns a `RoutingStats`, and `collect(model)` walks the
model, returns every block's sums under its module name, and resets them.
"""

from __future__ import annotations

import torch


class RoutingStats:
    """Sums of named tensors (tokens per group, dropped tokens, ...) since the last read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.calls = 0

    @torch.no_grad()
    def add(self, **values: torch.Tensor) -> None:
        self.calls += 1
        for key, value in values.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def read(self, reset: bool = True) -> dict[str, torch.Tensor]:
        out = {key: value.cpu() for key, value in self.sums.items()}
        if reset:
            self.sums, self.calls = {}, 0
        return out


def collect(model: torch.nn.Module, reset: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {counter: sums}} for every block of `model` that keeps routing stats."""
    found = {}
    for name, module in model.named_modules():
        stats = getattr(module, "stats", None)
        if isinstance(stats, RoutingStats) and stats.calls:
            found[name] = stats.read(reset)
    return found
