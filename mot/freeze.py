"""Freeze by modality: train some modalities' parameters on top of others held fixed.

This is MoT's asynchronous training (and LMFusion's frozen text tower): with `freeze: [text]`,
every parameter row that belongs to text alone -- its untied MoT copies, its embedding rows and
head rows -- stays fixed. Parameters shared by all modalities (e.g. attention under
`untie: ffn`) stay trainable.

Per-modality rows live inside (G, ...) tensors, so freezing works on rows: gradient hooks zero
the frozen rows (they never reach clipping or the optimizer's moments), and `attach(optimizer)`
restores them bit-exactly after each step (decoupled weight decay would otherwise shrink them).
A parameter whose rows are all frozen gets `requires_grad = False` instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def owned_rows(model: nn.Module, modality_ids: list[int]) -> dict[nn.Parameter, torch.Tensor]:
    """{parameter: row indices (dim 0) owned by the given modalities}."""
    rows: dict[nn.Parameter, list[int]] = {}
    for module in model.modules():
        if hasattr(module, "modality_slices"):
            slices = module.modality_slices()
        elif getattr(module, "modality_indexed", False):
            slices = module.group_slices()
        else:
            continue
        for param, group, sl in slices:
            if group in modality_ids:
                rows.setdefault(param, []).extend(range(sl.start, sl.stop))
    return {p: torch.tensor(sorted(set(r)), device=p.device) for p, r in rows.items()}


class FrozenModalities:
    """Keeps the rows of `model` owned by `modality_ids` fixed (see the module docstring)."""

    def __init__(self, model: nn.Module, modality_ids: list[int]):
        self.rows = {}
        for param, index in owned_rows(model, modality_ids).items():
            if index.numel() == param.shape[0]:
                param.requires_grad_(False)
            else:
                self.rows[param] = index
                param.register_hook(lambda grad, index=index: grad.index_fill(0, index, 0))
        self._saved: list[torch.Tensor] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer.step()` leave the frozen rows exactly as they were."""
        optimizer.register_step_pre_hook(self._save)
        optimizer.register_step_post_hook(self._restore)

    def _save(self, *_):
        self._saved = [p.detach()[i].clone() for p, i in self.rows.items()]

    @torch.no_grad()
    def _restore(self, *_):
        for (p, i), saved in zip(self.rows.items(), self._saved):
            p.index_copy_(0, i, saved)
