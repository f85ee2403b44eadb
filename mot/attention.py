"""Global self-attention over the interleaved multimodal sequence, and its masks.

One attention runs over all tokens of a sequence whatever their modality (early fusion; MoT
keeps it global too). Masks are built once per forward by `build_mask` and shared by every
layer. Three interchangeable backends compute the same function: `reference_attention` (plain
softmax, the readable definition), SDPA, and flash-attn's varlen kernels on CUDA.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import fused
from moe.grouping import Grouping
from mot.config import AttentionConfig, ModelConfig
from mot.layers import apply_rotary


@dataclass
class AttentionMask:
    """Who may attend to whom, in the forms the backends want.

    causal: plain causal attention, no explicit mask (the fast path of every backend).
    allowed: (B, 1, T, T) bool, True where query t may attend to key s; None when `causal`.
    cu_seqlens / max_seqlen: document boundaries of the flattened (B*T) batch, for flash varlen.
    """

    causal: bool
    allowed: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    additive: dict = field(default_factory=dict, repr=False)  # dtype -> bias, see `bias`

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` as an additive mask (0 or -inf) of `dtype`, built once for all layers:
        SDPA converts a boolean mask to this on every call, and its backward keeps each
        layer's copy."""
        if dtype not in self.additive:
            self.additive[dtype] = torch.zeros(self.allowed.shape, dtype=dtype,
                                               device=self.allowed.device).masked_fill_(
                ~self.allowed, float("-inf"))
        return self.additive[dtype]


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding: each
    forward with a cache appends its tokens, so generation costs grow linearly with length."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # tokens already in the cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, T, KV, hd) of `layer`; return all keys and values so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def mask(self, B: int, T: int, device) -> AttentionMask:
        """New token i (absolute position length + i) sees every cached token and the new
        tokens up to itself."""
        q = self.length + torch.arange(T, device=device)
        allowed = torch.arange(self.length + T, device=device)[None, :] <= q[:, None]
        return AttentionMask(causal=False, allowed=allowed.expand(B, 1, T, self.length + T))


def document_starts(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) bool, True where a new document begins (and at t = 0)."""
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return starts


def positions_from_documents(doc: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Position ids (B, T) that restart at 0 at each document start."""
    t = torch.arange(T, device=device).expand(B, T)
    if doc is None:
        return t
    start_index = torch.where(document_starts(doc), t, torch.zeros_like(t))
    return t - start_index.cummax(dim=1).values


def build_mask(cfg: AttentionConfig, modality: torch.Tensor, doc: torch.Tensor | None,
               bidirectional_ids: list[int]) -> AttentionMask:
    """The mask of one batch: modality (B, T) ids, doc (B, T) document ids or None."""
    B, T = modality.shape
    use_docs = doc is not None and cfg.document_mask
    cu_seqlens, max_seqlen = None, T
    if use_docs:
        starts = document_starts(doc).flatten()
        starts_idx = starts.nonzero().flatten()
        cu_seqlens = torch.cat([starts_idx, starts_idx.new_tensor([B * T])]).to(torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if cfg.mask == "causal" and not use_docs:
        return AttentionMask(causal=True, max_seqlen=T)
    t = torch.arange(T, device=modality.device)
    allowed = (t[:, None] >= t[None, :]).expand(B, T, T)  # (B, T, T)
    if use_docs:
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    if cfg.mask == "bidirectional_spans":
        # A span is a maximal run of one bidirectional modality inside one document.
        new_run = torch.ones_like(modality, dtype=torch.bool)
        new_run[:, 1:] = modality[:, 1:] != modality[:, :-1]
        if use_docs:
            new_run |= document_starts(doc)
        run = new_run.cumsum(dim=1)  # (B, T)
        in_span = torch.isin(modality, torch.tensor(bidirectional_ids, device=modality.device))
        same_span = (run[:, :, None] == run[:, None, :]) & in_span[:, :, None]
        allowed = allowed | same_span
    return AttentionMask(causal=False, allowed=allowed[:, None], cu_seqlens=cu_seqlens,
                         max_seqlen=max_seqlen)


def reference_attention(q, k, v, mask: AttentionMask, dropout: float = 0.0) -> torch.Tensor:
    """Plain softmax attention. q (B, T, H, hd), k and v (B, T, KV, hd) -> (B, T, H, hd)."""
    B, T, H, hd = q.shape
    repeat = H // k.shape[2]
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(hd)  # (B,H,T,T)
    if mask.causal:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = mask.allowed
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)


def sdpa_attention(q, k, v, mask: AttentionMask, dropout: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, same shapes as `reference_attention`."""
    H, KV = q.shape[2], k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=None if mask.causal else mask.bias(q.dtype), is_causal=mask.causal,
        dropout_p=dropout, enable_gqa=H != KV)  # (B, H, T, hd)
    return out.transpose(1, 2)


def flash_available() -> str | None:
    """None when the flash backend can be built, else what is missing."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package (pip install 'mot-moe[gpu]')"
    if not torch.cuda.is_available():
        return "a CUDA device"
    return None


def flash_attention(q, k, v, mask: AttentionMask, dropout: float = 0.0) -> torch.Tensor:
    """flash-attn kernels: dense causal, or varlen causal over packed documents."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention.backend 'flash' needs CUDA tensors in float16 or bfloat16, "
                         f"got {q.device} {q.dtype}")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if mask.cu_seqlens is None:
        return flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
    B, T, H, hd = q.shape
    out = flash_attn_varlen_func(
        q.reshape(B * T, H, hd), k.reshape(B * T, -1, hd), v.reshape(B * T, -1, hd),
        mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
        dropout_p=dropout, causal=True)
    return out.view(B, T, H, hd)


BACKENDS = {"reference": reference_attention, "sdpa": sdpa_attention, "flash": flash_attention}


class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention whose projections and QK-norms come from the
    layer's block config, so that MoT can untie them by modality."""

    def __init__(self, cfg: ModelConfig, block):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.attention.dropout
        if cfg.attention.backend == "flash" and (missing := flash_available()):
            raise ValueError(f"attention.backend 'flash' needs {missing}; use 'sdpa'")
        self.attend = BACKENDS[cfg.attention.backend]
        qkv_dim = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = block.build_linear(cfg, "attn", cfg.dim, qkv_dim)
        self.wo = block.build_linear(cfg, "attn", cfg.n_heads * cfg.head_dim, cfg.dim)
        self.q_norm = block.build_norm(cfg, "qk_norm", cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = block.build_norm(cfg, "qk_norm", cfg.head_dim) if cfg.qk_norm else None

    def heads(self, qkv, groups, rope):
        """The fused projection qkv, in the layout of `groups` ((B, T, W) or grouped rows (N, W)),
        -> q (B, T, H, hd), k, v (B, T, KV, hd) in sequence order, q and k QK-normed and rotated.
        With plain or grouped RMSNorms (or none), split, norms, rotation and the gathers into
        sequence order are one compiled pass (`moe.fused.qkv_heads`) where it runs; otherwise
        (other norm modules, CUDA, no extension) the same steps run as separate ops."""
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        cos, sin = rope
        grouped = isinstance(groups, Grouping) and groups.grouped
        src = groups.position if grouped else None  # position -> grouped row
        out = None
        if self.q_norm is None:
            out = fused.qkv_heads(qkv, H, KV, cos, sin, src=src)
        elif hasattr(self.q_norm, "head_norm_args") and hasattr(self.k_norm, "head_norm_args"):
            q_weight, eps, ids = self.q_norm.head_norm_args(groups, qkv.dtype)
            k_weight = self.k_norm.head_norm_args(groups, qkv.dtype)[0]
            out = fused.qkv_heads(qkv, H, KV, cos, sin, q_weight, k_weight, eps, src, ids)
        if out is not None:
            return out
        rows = qkv.shape[:-1]  # (B, T), or (N,) grouped rows
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q, k, v = q.view(*rows, H, hd), k.view(*rows, KV, hd), v.view(*rows, KV, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q, groups), self.k_norm(k, groups)
        if grouped:
            q, k, v = groups.to_sequence(q), groups.to_sequence(k), groups.to_sequence(v)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, groups, rope, mask: AttentionMask, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x in the layout of `groups`: (B, T, D), or (N, D) rows grouped by modality. Attention
        itself always runs in sequence order; only its projections see the grouped rows. With a
        `cache`, keys and values of earlier tokens are reused and this call's are appended."""
        grouped = isinstance(groups, Grouping) and groups.grouped
        q, k, v = self.heads(self.wqkv(x, groups), groups, rope)  # (B, T, heads, hd)
        B, T = q.shape[:2]
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, L + T, KV, hd)
        out = self.attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B,T,H,hd)
        out = out.reshape(B, T, self.n_heads * self.head_dim)
        if grouped:
            out = groups.from_sequence(out)  # (N, H hd)
        return self.wo(out, groups)
