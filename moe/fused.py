"""Fused element-wise kernels of the transformer block, with their PyTorch references:

    rms_norm(x, weight, eps, group_rows)  RMSNorm; weight (G, D) gives one row per group of rows
    swiglu(a, b)                          the SwiGLU gate silu(a) * b
    swiglu_halves(gate_up)                the same of gate_up = [a | b] side by side
    rotary(x, cos, sin)                   rotary embeddings, x (B, T, H, hd), cos/sin (B, T, 1, hd)
    qkv_heads(qkv, H, KV, cos, sin, ...)  the attention's q, k, v from its fused projection: split,
                                          QK-norm, rotary and (for grouped rows) sequence order
    router_topk(logits, k, ...)           router scores, top-k experts, weights (router_cpu.cpp)

Each unfused form is a chain of 4-8 torch ops over the whole tensor (forward and backward); at a
small model's sizes those passes cost about as much as its matmuls. The compiled CPU kernels
(`csrc/fused_cpu.cpp`, `csrc/qkv_cpu.cpp`, `torch.ops.moe_ops`) make each one pass forward and
one backward. They run for CPU tensors when the extension is built; elsewhere (CUDA, no
extension, float64 rows with float32 weights, ...) the reference runs, which is also the
readable definition, except for `qkv_heads` and `router_topk`, which return None there so that
the caller composes its usual separate ops.
"""

from __future__ import annotations

import torch

from moe.ops import AVAILABLE, _acc

_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
KERNEL_DTYPES = _HALF_OR_FLOAT + (torch.float64,)


# ---- references ---------------------------------------------------------------------------

def rms_norm_reference(x, weight, eps: float, group_rows=None):
    """x (..., D); weight (D,), or (G, D) with `group_rows` (G counts) splitting the rows of x
    flattened to (M, D) into consecutive groups. Sums in float32 (float64 for float64)."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if weight.dim() == 2:
        counts = torch.tensor(group_rows, device=x.device)
        weight = weight.repeat_interleave(counts, dim=0, output_size=rows.shape[0])
    acc = _acc(x.dtype)
    xf = rows.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype).view(x.shape)


def swiglu_reference(a, b):
    return torch.nn.functional.silu(a) * b


def swiglu_halves_reference(gate_up):
    """gate_up (M, 2H), the gate and up products side by side -> silu(gate) * up (M, H)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


def rotary_reference(x, cos, sin):
    """Rotate-half rotary embeddings: x (B, T, H, hd) by the angles in cos/sin (B, T, 1, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _head_norm(x, weight, eps: float):
    """RMSNorm of each head x (B, T, heads, hd) by per-position weights (B, T, 1, hd)."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


def qkv_heads_reference(qkv, heads: int, kv_heads: int, cos, sin, q_weight=None, k_weight=None,
                        eps: float = 1e-6, src=None, group=None):
    """The attention's inputs from its fused projection. qkv (P, (heads + 2 kv_heads) hd) rows
    (or (B, T, ...)), position p = b T + t reading row src[p] (row p without src) -> q (B, T,
    heads, hd), k and v (B, T, kv_heads, hd): q and k RMS-normalised per head with weight row
    group[p] of q_weight / k_weight (G, hd) or (hd,) (row 0 without group; no norm without
    weights), then rotated by cos, sin (B, T, 1, hd)."""
    B, T, _, hd = cos.shape
    rows = qkv.reshape(B * T, -1)
    if src is not None:
        rows = rows[src]
    q, k, v = rows.view(B, T, -1).split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q, k = q.view(B, T, heads, hd), k.view(B, T, kv_heads, hd)
    if q_weight is not None:
        ids = torch.zeros(B * T, dtype=torch.long, device=qkv.device) if group is None else group
        q = _head_norm(q, q_weight.view(-1, hd)[ids].view(B, T, 1, hd), eps)
        k = _head_norm(k, k_weight.view(-1, hd)[ids].view(B, T, 1, hd), eps)
    return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin), \
        v.reshape(B, T, kv_heads, hd)


# ---- fake kernels (autograd: csrc/autograd.cpp) --------------------------------------------

if AVAILABLE:
    ops = torch.ops.moe_ops

    @torch.library.register_fake("moe_ops::rms_norm")
    def _(x, weight, group_rows, eps):
        return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_acc(x.dtype))

    @torch.library.register_fake("moe_ops::rms_norm_backward")
    def _(grad, x, weight, rstd, group_rows):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("moe_ops::swiglu")
    def _(a, b):
        return torch.empty_like(a)

    @torch.library.register_fake("moe_ops::swiglu_backward")
    def _(grad, a, b):
        return torch.empty_like(a), torch.empty_like(b)

    # gate and up side by side (M, 2H): the grouped SwiGLU FFN's half-precision passes
    @torch.library.register_fake("moe_ops::swiglu_halves")
    def _(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    @torch.library.register_fake("moe_ops::swiglu_halves_backward")
    def _(grad, gate_up):
        return torch.empty_like(gate_up)

    @torch.library.register_fake("moe_ops::rotary")
    def _(x, cos, sin, transpose):
        return x.new_empty(x.shape, dtype=cos.dtype)

    @torch.library.register_fake("moe_ops::qkv_heads")
    def _(qkv, src, group, q_weight, k_weight, cos, sin, heads, kv_heads, eps):
        B, T, hd = cos.shape
        return (cos.new_empty(B, T, heads, hd), cos.new_empty(B, T, kv_heads, hd),
                qkv.new_empty(B, T, kv_heads, hd))

    @torch.library.register_fake("moe_ops::qkv_heads_backward")
    def _(grad_q, grad_k, grad_v, qkv, src, group, q_weight, k_weight, cos, sin, eps):
        if q_weight is None:
            return torch.empty_like(qkv), qkv.new_empty(0), qkv.new_empty(0)
        return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)

    @torch.library.register_fake("moe_ops::router_topk")
    def _(logits, bias, k, renormalize, sigmoid):
        N, E = logits.shape
        f32 = dict(dtype=torch.float32)
        return (logits.new_empty(N, E, **f32), logits.new_empty(N, k, dtype=torch.long),
                logits.new_empty(N, k, **f32), logits.new_empty(N, **f32),
                logits.new_empty(E, **f32), logits.new_empty((), **f32))

    @torch.library.register_fake("moe_ops::router_topk_backward")
    def _(grad_scores, grad_weight, grad_lse, grad_prob_sum, scores, expert, renormalize,
          sigmoid):
        return torch.empty_like(scores)


def _pair_ok(x: torch.Tensor, other: torch.Tensor) -> bool:
    """The (rows, weights) dtype pairs the kernels take: equal, or float32 beside half rows."""
    return AVAILABLE and x.device.type == "cpu" and other.device.type == "cpu" and (
        other.dtype == x.dtype and x.dtype in KERNEL_DTYPES
        or other.dtype == torch.float32 and x.dtype in _HALF_OR_FLOAT)


# ---- the functions the layers call --------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_rows=None) -> torch.Tensor:
    """RMSNorm of x (..., D) with weight (D,), or with weight (G, D) and `group_rows` (G counts
    of the rows of x flattened to (M, D), in order)."""
    if not _pair_ok(x, weight) or x.shape[-1] == 0:
        return rms_norm_reference(x, weight, eps, group_rows)
    D = x.shape[-1]
    rows = x.reshape(-1, D).contiguous()
    if weight.dim() == 1:
        weight, group_rows = weight.view(1, D), [rows.shape[0]]
    return ops.rms_norm(rows, weight.contiguous(), list(group_rows), eps)[0].view(x.shape)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a and b of one shape."""
    if a.shape != b.shape or not _pair_ok(a, b) or b.dtype != a.dtype:
        return swiglu_reference(a, b)
    return ops.swiglu(a.contiguous(), b.contiguous())


def swiglu_halves(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2H) = [gate | up] -> (..., H)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd) rotated by cos/sin (B, T, 1, hd); the result has cos's dtype when that is
    the wider one (as the reference's type promotion gives)."""
    B, T, H, hd = x.shape
    if (hd % 2 or cos.shape != (B, T, 1, hd) or sin.shape != cos.shape or sin.dtype != cos.dtype
            or not _pair_ok(x, cos) or cos.requires_grad or sin.requires_grad
            or x.stride(-1) != 1):
        return rotary_reference(x, cos, sin)
    return ops.rotary(x, cos.reshape(B, T, hd).contiguous(), sin.reshape(B, T, hd).contiguous(),
                      False)


def qkv_heads(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor,
              sin: torch.Tensor, q_weight: torch.Tensor | None = None,
              k_weight: torch.Tensor | None = None, eps: float = 1e-6,
              src: torch.Tensor | None = None, group: torch.Tensor | None = None):
    """`qkv_heads_reference` (same arguments and results) in one pass forward and one backward,
    which writes the projection's gradient in one buffer; or None where the compiled kernel does
    not run (then the caller composes the unfused ops: split, `rms_norm`, gathers, `rotary`)."""
    B, T, _, hd = cos.shape
    width = (heads + 2 * kv_heads) * hd
    weights_ok = q_weight is None and k_weight is None and group is None or (
        q_weight is not None and k_weight is not None and q_weight.dtype == k_weight.dtype
        and q_weight.shape == k_weight.shape and q_weight.shape[-1] == hd
        and _pair_ok(qkv, q_weight) and not (group is None and q_weight.numel() != hd))
    if not (weights_ok and _pair_ok(qkv, cos) and sin.dtype == cos.dtype
            and sin.shape == cos.shape == (B, T, 1, hd) and hd % 2 == 0 and hd <= 1024
            and not cos.requires_grad and not sin.requires_grad
            and qkv.numel() == B * T * width and qkv.shape[-1] == width):
        return None
    if q_weight is not None:
        q_weight, k_weight = q_weight.reshape(-1, hd), k_weight.reshape(-1, hd)
    return ops.qkv_heads(qkv.reshape(B * T, width).contiguous(),
                         None if src is None else src.reshape(-1).long().contiguous(),
                         None if group is None else group.reshape(-1).long().contiguous(),
                         q_weight, k_weight, cos.reshape(B, T, hd).contiguous(),
                         sin.reshape(B, T, hd).contiguous(), heads, kv_heads, eps)


def router_topk(logits: torch.Tensor, k: int, renormalize: bool, sigmoid: bool,
                bias: torch.Tensor | None = None):
    """logits (N, E) -> scores (N, E) float32, expert (N, k) int64, weight (N, k) float32, and
    for the losses and statistics lse (N,) (logsumexp of the logits), prob_sum (E,) (the routing
    probabilities summed over tokens) and entropy () (theirs, summed), all float32: the compiled
    one-pass router, or None where it does not run (then the caller composes
    `moe.routing.router_scores` and `topk_route`, and `moe.losses`, its reference)."""
    if not (AVAILABLE and logits.device.type == "cpu" and logits.dim() == 2
            and logits.dtype in KERNEL_DTYPES and logits.shape[0] > 0
            and (bias is None or bias.dtype == torch.float32 and bias.device.type == "cpu")):
        return None
    return ops.router_topk(logits.contiguous(), None if bias is None else bias.contiguous(), k,
                           renormalize, sigmoid)
