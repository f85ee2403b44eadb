"""Routing report of any model holding MoE / MoT blocks: run it on a batch, read the statistics.

    report = routing_report(model, lambda: model(tokens, modality))
    report["layers.0.ffn"]["specialisation"]   # normalised modality-expert mutual information

Works on a live model and on a block lifted into another model: it only reads the
`RoutingStats` each routed block keeps (`moe.stats`), reset before the run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe.stats import collect, summarize


def specialisation(counts: torch.Tensor) -> float:
    """Mutual information between modality (rows) and expert (columns) of a count table,
    divided by the smaller of the two entropies: 0 when experts ignore modality, 1 when each
    modality uses experts of its own only."""
    p = counts.double() / counts.sum().clamp(min=1)
    pm, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pm @ pe)[nz]).log()).sum())
    entropy = lambda q: float(-(q[q > 0] * q[q > 0].log()).sum())  # noqa: E731
    scale = min(entropy(pm), entropy(pe))
    return mi / scale if scale > 0 else 0.0


def routing_report(model: torch.nn.Module, run: Callable[[], object],
                   modality_names: list[str] | None = None) -> dict[str, dict]:
    """Reset the statistics, call `run()`, and return per routed layer: its summary metrics
    (token shares, load CV, drop fraction, router entropy, aux losses), the modality x expert
    count table and the specialisation score when modality ids were given."""
    collect(model)  # reset whatever earlier calls accumulated
    with torch.no_grad():
        run()
    report = {}
    for layer, sums in collect(model).items():
        entry = {"metrics": summarize(sums, row_labels=modality_names),
                 "tokens": sums["tokens"].tolist()}
        table = sums.get("modality_tokens")
        if table is not None:
            entry["modality_expert"] = table.tolist()
            entry["specialisation"] = specialisation(table)
        report[layer] = entry
    return report

