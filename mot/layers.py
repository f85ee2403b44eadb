"""Small building blocks of the backbone: norms, linears and rotary embeddings.

Every module here takes `(x, groups=None)`: the dense versions ignore `groups`, and the
modality-routed versions of `mot.mot` (same call) use it. That one signature is what lets a
block config swap parts of a layer without the layer knowing. Norms and rotary embeddings run
the fused kernels of `moe.fused` (one pass forward, one backward) where they are built.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import fused


class Linear(nn.Linear):
    """`nn.Linear` without bias that accepts (and ignores) the routing argument."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor, groups=None) -> torch.Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters and result) that accepts and ignores the routing argument
    and runs the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor, groups=None) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return fused.rms_norm(x, self.weight, eps)

    def head_norm_args(self, groups, dtype: torch.dtype):
        """(weight, eps, group ids) for `moe.fused.qkv_heads` to apply this norm to heads of
        `dtype`: one weight for every position, no ids."""
        return self.weight, torch.finfo(dtype).eps if self.eps is None else self.eps, None


class Rotary(nn.Module):
    """Rotary position embeddings (rotate-half form) for explicit position ids."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (B, T) -> cos, sin of shape (B, T, 1, head_dim), to broadcast over heads."""
        angles = positions[:, :, None, None].float() * self.inv_freq  # (B, T, 1, hd/2)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd) rotated by the angles in cos/sin (B, T, 1, hd) (rotate-half form:
    `x * cos + cat(-x2, x1) * sin`, `moe.fused.rotary_reference`)."""
    return fused.rotary(x, cos, sin)
