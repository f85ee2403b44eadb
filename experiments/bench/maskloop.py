"""The boolean-mask loop style of MoT, as the paper's reference code runs it: one module per
modality, and for each modality a boolean mask that gathers its tokens and scatters results back,
at every projection, norm and FFN. Kept as the baseline of `experiments.bench mot` and checked
against our MoT layer in the tests, so the comparison is between equal functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mot.attention import sdpa_attention
from mot.layers import apply_rotary


class MaskLoopMoTLayer(nn.Module):
    """One MoT transformer layer (untie "all", pre-norm, QK-norm) with per-modality modules."""

    def __init__(self, num_modalities: int, dim: int, n_heads: int, hidden: int,
                 eps: float = 1e-5):
        super().__init__()
        self.M, self.H, self.hd, self.eps = num_modalities, n_heads, dim // n_heads, eps

        def tower():
            return nn.ModuleDict(dict(
                attn_norm=nn.RMSNorm(dim, eps=eps), ffn_norm=nn.RMSNorm(dim, eps=eps),
                q_norm=nn.RMSNorm(self.hd, eps=eps), k_norm=nn.RMSNorm(self.hd, eps=eps),
                wq=nn.Linear(dim, dim, bias=False), wk=nn.Linear(dim, dim, bias=False),
                wv=nn.Linear(dim, dim, bias=False), wo=nn.Linear(dim, dim, bias=False),
                w1=nn.Linear(dim, hidden, bias=False), w3=nn.Linear(dim, hidden, bias=False),
                w2=nn.Linear(hidden, dim, bias=False)))

        self.towers = nn.ModuleList(tower() for _ in range(num_modalities))

    @torch.no_grad()
    def copy_from(self, layer) -> None:
        """Load the weights of our MoT `TransformerLayer` (untie "all")."""
        D = self.H * self.hd
        for m, t in enumerate(self.towers):
            wq, wk, wv = layer.attn.wqkv.weight[m].t().split(D, dim=0)
            for name, w in dict(wq=wq, wk=wk, wv=wv, wo=layer.attn.wo.weight[m].t(),
                                w1=layer.ffn.w1[m].t(), w3=layer.ffn.w3[m].t(),
                                w2=layer.ffn.w2[m].t()).items():
                t[name].weight.copy_(w)
            for name, norm in dict(attn_norm=layer.attn_norm, ffn_norm=layer.ffn_norm,
                                   q_norm=layer.attn.q_norm, k_norm=layer.attn.k_norm).items():
                t[name].weight.copy_(norm.weight[m])

    def per_modality(self, x, masks, fn, out_dim):
        out = x.new_zeros(*x.shape[:-1], out_dim)
        for m, mask in enumerate(masks):
            out[mask] = fn(self.towers[m], x[mask])
        return out

    def forward(self, x, modality, rope, mask):
        B, T, D = x.shape
        masks = [modality == m for m in range(self.M)]
        h = self.per_modality(x, masks, lambda t, v: t["attn_norm"](v), D)
        q = self.per_modality(h, masks, lambda t, v: t["q_norm"](
            t["wq"](v).view(-1, self.H, self.hd)).flatten(1), D)
        k = self.per_modality(h, masks, lambda t, v: t["k_norm"](
            t["wk"](v).view(-1, self.H, self.hd)).flatten(1), D)
        v = self.per_modality(h, masks, lambda t, v: t["wv"](v), D)
        cos, sin = rope
        shape = (B, T, self.H, self.hd)
        q, k = apply_rotary(q.view(shape), cos, sin), apply_rotary(k.view(shape), cos, sin)
        attn = sdpa_attention(q, k, v.view(shape), mask).reshape(B, T, D)
        x = x + self.per_modality(attn, masks, lambda t, v: t["wo"](v), D)
        h = self.per_modality(x, masks, lambda t, v: t["ffn_norm"](v), D)
        ffn = lambda t, v: t["w2"](F.silu(t["w1"](v)) * t["w3"](v))  # noqa: E731
        return x + self.per_modality(h, masks, ffn, D)
