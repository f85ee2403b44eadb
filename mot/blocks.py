"""Block kinds of the backbone and the one registry that maps their names to typed configs.

A block config builds the parts of a layer that it owns: the FFN always, and through
`build_linear` / `build_norm` the attention projections and norms (dense ones by default; MoT
unties them by modality). New kinds plug in with `register_block` and need no change to the
backbone. Each FFN honours the block contract: `ffn(x, modality) -> y` with y shaped like x.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch.nn as nn

from moe.layers import SwiGLU
from mot.config import check, check_positive
from mot.layers import Linear, RMSNorm

BLOCKS: dict[str, type] = {}


def register_block(kind: str):
    """Class decorator: make a config class buildable under `kind` from YAML / the CLI."""

    def wrap(cls):
        cls.kind = kind
        BLOCKS[kind] = cls
        return cls

    return wrap


def block_config(kind: str, options: Any):
    """The typed config of block `kind` from a dict of options (or an existing config)."""
    check(kind in BLOCKS, f"unknown block kind {kind!r}; valid: {sorted(BLOCKS)}")
    cls = BLOCKS[kind]
    if isinstance(options, cls):
        return options
    options = {} if options is None else options
    check(isinstance(options, dict), f"blocks.{kind} must be a mapping of options")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    check(not unknown, f"blocks.{kind}: unknown option(s) {unknown}; valid: {sorted(names)}")
    return cls(**options)


@dataclass
class BlockConfig:
    """Base of every block config. Subclasses override what they untie or replace."""

    kind: ClassVar[str] = ""
    needs_grouping: ClassVar[bool] = False  # ask the backbone for the shared modality grouping

    def validate_for(self, model) -> None:
        """Checks that need the model config (e.g. modality names)."""

    def build_ffn(self, model) -> nn.Module:
        raise NotImplementedError

    def build_linear(self, model, part: str, d_in: int, d_out: int) -> nn.Module:
        return Linear(d_in, d_out)

    def build_norm(self, model, part: str, dim: int) -> nn.Module:
        return RMSNorm(dim, eps=model.norm_eps)

    # Accounting, per layer: parameters in the FFN (total, active per token) and matmul FLOPs
    # of one token's forward through the FFN. Attention is counted by the backbone.
    def ffn_params(self, model) -> tuple[int, int]:
        raise NotImplementedError

    def ffn_flops(self, model) -> int:
        raise NotImplementedError

    def copies(self, model, part: str) -> int:
        """How many copies of an attention/norm part this block holds (MoT: one per modality)."""
        return 1


@register_block("dense")
@dataclass
class DenseConfig(BlockConfig):
    """One SwiGLU FFN for every token. `hidden` overrides the model's `ffn_hidden`."""

    hidden: int | None = None

    def __post_init__(self):
        if self.hidden is not None:
            check_positive("blocks.dense.hidden", self.hidden)

    def hidden_dim(self, model) -> int:
        return self.hidden or model.ffn_hidden

    def build_ffn(self, model) -> nn.Module:
        return SwiGLU(model.dim, self.hidden_dim(model))

    def ffn_params(self, model) -> tuple[int, int]:
        n = 3 * model.dim * self.hidden_dim(model)
        return n, n

    def ffn_flops(self, model) -> int:
        return 2 * 3 * model.dim * self.hidden_dim(model)
