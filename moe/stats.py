"""Routing statistics: counters a block accumulates until the trainer reads and resets them.

Nothing is global: each routed block owns a `RoutingStats`, and `collect(model)` walks the
model, returns every block's sums under its module name, and resets them.
"""

from __future__ import annotations

import torch


class RoutingStats:
    """Sums of named tensors or numbers (tokens per group, dropped tokens, ...) since the last
    read, in float64. `add` only queues its values (a block calls it in every forward, where
    each tiny op costs); they are summed every `FOLD` calls and on `read`. A tensor handed to
    `add` must not be modified in place afterwards."""

    FOLD = 64

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.pending: list[dict] = []
        self.calls = 0

    def add(self, **values) -> None:
        self.calls += 1
        self.pending.append({key: value.detach() if isinstance(value, torch.Tensor) else value
                             for key, value in values.items()})
        if len(self.pending) >= self.FOLD:
            self.fold()

    @torch.no_grad()
    def fold(self) -> None:
        """Add the queued values into the sums."""
        for values in self.pending:
            for key, value in values.items():
                value = torch.as_tensor(value, dtype=torch.float64)
                total = self.sums.get(key)
                if total is None:
                    self.sums[key] = value.clone()
                    continue
                if total.shape != value.shape:  # e.g. a modality seen for the first time
                    shape = [max(a, b) for a, b in zip(total.shape, value.shape)]
                    total, value = _pad(total, shape), _pad(value, shape)
                self.sums[key] = total + value.to(total.device)
        self.pending = []

    def read(self, reset: bool = True) -> dict[str, torch.Tensor]:
        self.fold()
        out = {key: value.cpu() for key, value in self.sums.items()}
        if reset:
            self.sums, self.calls = {}, 0
        return out


def _pad(t: torch.Tensor, shape: list[int]) -> torch.Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def collect(model: torch.nn.Module, reset: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {counter: sums}} for every block of `model` that keeps routing stats."""
    found = {}
    for name, module in model.named_modules():
        stats = getattr(module, "stats", None)
        if isinstance(stats, RoutingStats) and stats.calls:
            found[name] = stats.read(reset)
    return found


def summarize(sums: dict[str, torch.Tensor], labels: list[str] | None = None,
              row_labels: list[str] | None = None) -> dict[str, float]:
    """Readable metrics of one block's sums: the share of tokens per group (`tokens/<label>`),
    the load's coefficient of variation, the fraction of routed slots dropped, the mean router
    entropy per token, the mean auxiliary losses (unweighted), and per-modality shares over
    experts (`modality_tokens/<m>/<e>`).
    labels name the groups (modality names for MoT; expert indices by default); row_labels name
    the modalities of `modality_tokens`."""
    out: dict[str, float] = {}
    tokens = sums.get("tokens")
    if tokens is not None and tokens.sum() > 0:
        names = labels if labels and len(labels) == len(tokens) else [str(i) for i in
                                                                       range(len(tokens))]
        for name, share in zip(names, (tokens / tokens.sum()).tolist()):
            out[f"tokens/{name}"] = share
        out["load_cv"] = float(tokens.std(unbiased=False) / tokens.mean())
        if "dropped" in sums:
            out["drop_fraction"] = float(sums["dropped"] / tokens.sum())
    if "entropy" in sums and sums.get("rows", 0) > 0:
        out["router_entropy"] = float(sums["entropy"] / sums["rows"])
    for loss in ("balance_loss", "z_loss"):  # mean over the forward calls since the last read
        if loss in sums and sums.get("calls", 0) > 0:
            out[loss] = float(sums[loss] / sums["calls"])
    per_modality = sums.get("modality_tokens")
    if per_modality is not None:
        for m, row in enumerate(per_modality):
            if row.sum() == 0:
                continue
            name = row_labels[m] if row_labels and m < len(row_labels) else str(m)
            for e, share in enumerate((row / row.sum()).tolist()):
                out[f"modality_tokens/{name}/{e}"] = share
    return out
