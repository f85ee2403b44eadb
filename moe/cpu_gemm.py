"""Grouped GEMM on CPU: for bfloat16 / float16 cut so that oneDNN sees few distinct shapes, and
shared out among the threads (compiled kernels) in every dtype.

On CPU, half-precision matmuls run through oneDNN, which compiles (JITs) a kernel for every new
shape it meets: 2-8 ms, against 0.5 ms for the (1024, 512) x (512, 1024) product itself. Expert
and modality groups change size every step, so a plain per-group loop (and torch's CPU
`grouped_mm`, which is one) compiles nearly every call: a bfloat16 MoE FFN whose routing changes
between steps ran 3-4x slower than the same step with repeated routing (see README, Benchmarks).

Here every GEMM runs on a whole number of 64-row blocks, so oneDNN sees row counts that are
multiples of 64 only and, after a short warm-up, every call hits its primitive cache. Products
by rows (the forward, the input gradient) round each group up to whole blocks, reading into the
next group's rows and writing garbage that the next group then overwrites; the weight gradient
(a sum over rows) runs the whole blocks, then the last partial block zero-padded (`addmm_`).
The rounding costs at most 63 rows of FLOPs per group; the readable definition is
`moe.grouping.grouped_linear_reference`. With the compiled kernels (csrc/group_gemm_cpu.cpp) the
same blocks run with the groups shared out among the threads, one product per thread, which
mid-sized half-precision products need to use both cores fully; the loops below are their
readable twin and the fallback. In float32 / float64 the same kernels run exact rows (`block=1`:
BLAS compiles nothing per shape); sharing groups out among the threads beats torch's grouped_mm,
which runs them in turn with both threads on each small product (see README, Benchmarks).
"""

from __future__ import annotations

import torch

from moe.ops import AVAILABLE as _compiled

BLOCK = 64
# The fused SwiGLU FFN kernels' rows per block: 0 lets them choose by dtype (exact rows in
# float32 / float64; 16-row blocks in half precision, padding a piece by 8 rows on average,
# csrc/moe_group_plan.h).
FFN_BLOCK = 0


def head_end(start: int, end: int, block: int = BLOCK) -> int:
    """The end of the whole-block head of rows [start, end)."""
    return start + (end - start) // block * block


def spans_of(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def _padded(rows: torch.Tensor) -> torch.Tensor:
    """(r < BLOCK, D) -> (BLOCK, D), zeros below."""
    out = rows.new_zeros(BLOCK, rows.shape[1])
    out[:rows.shape[0]] = rows
    return out


def rows_times(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, s: int, e: int) -> None:
    """out[s:e] = a[s:e] @ b, computing whole blocks: a block that runs past e reads the next
    group's rows and writes garbage into the next group's output rows, which that group
    overwrites afterwards (groups are computed in order). Near the end of the buffer the tail
    runs zero-padded instead."""
    if e == s:
        return
    stop = s + -(-(e - s) // BLOCK) * BLOCK
    if stop <= a.shape[0]:
        torch.mm(a[s:stop], b, out=out[s:stop])
        return
    cut = head_end(s, e)
    if cut > s:
        torch.mm(a[s:cut], b, out=out[s:cut])
    if e > cut:
        out[cut:e] = (_padded(a[cut:e]) @ b)[:e - cut]


def rows_inner(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, s: int, e: int) -> None:
    """out = a[s:e]^T @ b[s:e] (zeros for no rows)."""
    cut = head_end(s, e)
    if cut > s:
        torch.mm(a[s:cut].t(), b[s:cut], out=out)
    else:
        out.zero_()
    if e > cut:
        out.addmm_(_padded(a[cut:e]).t(), _padded(b[cut:e]))


def block_rows(dtype: torch.dtype) -> int:
    """Rows per block of the compiled kernels: BLOCK in half precision, else 1 (exact rows)."""
    return BLOCK if dtype in (torch.bfloat16, torch.float16) else 1


def group_rows(a: torch.Tensor, b: torch.Tensor, spans) -> torch.Tensor:
    """(N, M): rows of group g = a[rows of g] @ b[g]; rows past the last group are zero."""
    if _compiled:  # the same blocks, the groups shared out among the threads
        return torch.ops.moe_ops.group_rows_mm(a, b, [e for _, e in spans], True,
                                               block_rows(a.dtype))
    out = a.new_empty(a.shape[0], b.shape[2])
    for g, (s, e) in enumerate(spans):
        rows_times(a, b[g], out, s, e)
    out[spans[-1][1] if spans else 0:] = 0  # rows past the last group (and its spill)
    return out


def group_inner(a: torch.Tensor, b: torch.Tensor, spans) -> torch.Tensor:
    """(G, Da, Db): group g = a[rows of g]^T @ b[rows of g]."""
    if _compiled:
        return torch.ops.moe_ops.group_inner_mm(a, b, [e for _, e in spans], True,
                                                block_rows(a.dtype))
    out = a.new_empty(len(spans), a.shape[1], b.shape[1])
    for g, (s, e) in enumerate(spans):
        rows_inner(a, b, out[g], s, e)
    return out


class SplitGroupedMM(torch.autograd.Function):
    """x (N, D_in) grouped rows, weight (G, D_in, D_out), spans [(start, end)] per group in
    order -> (N, D_out); rows past the last group give zeros."""

    @staticmethod
    def forward(ctx, x, weight, spans):
        ctx.save_for_backward(x, weight)
        ctx.spans = spans
        return group_rows(x, weight, spans)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = group_rows(grad, weight.transpose(1, 2), ctx.spans)
        if ctx.needs_input_grad[1]:
            grad_w = group_inner(x, grad, ctx.spans)
        return grad_x, grad_w, None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Half precision on CPU always (the loops below without the compiled kernels); float32 /
    float64 on CPU with the compiled kernels (else torch's grouped_mm or the reference loop)."""
    if x.device.type != "cpu" or weight.dtype != x.dtype:
        return False
    if x.dtype in (torch.bfloat16, torch.float16):
        return True
    return _compiled and x.dtype in (torch.float32, torch.float64)


def grouped_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   offsets: torch.Tensor) -> torch.Tensor | None:
    """The whole grouped SwiGLU FFN as one compiled op with one C++ autograd node
    (`moe_ops::grouped_swiglu`: w13 (G, D, 2H) holds each group's gate and up weights side by
    side, so they are one product, as are their weight gradient and the input gradient; every
    step run group by group within each thread, on exact rows in float32 / float64 and whole
    16-row blocks in half precision, csrc/swiglu_ffn_cpu.cpp); None where it does not apply (no
    compiled kernels, or not every tensor of x's dtype on CPU)."""
    if not _compiled or not all(applies(x, w) for w in (w13, w2)):
        return None
    return torch.ops.moe_ops.grouped_swiglu(x.contiguous(), w13, w2, offsets.tolist(),
                                            FFN_BLOCK)


def routed_swiglu(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, dispatch,
                  weight: torch.Tensor) -> torch.Tensor | None:
    """An MoE's experts with the dispatch's gather and weighted combine in the same op:
    rows (N, D) tokens, `dispatch` a `moe.dispatch.TopKDispatch` (exact rows), weight (N, k)
    -> (N, D), equal to `dispatch.combine(grouped_swiglu(dispatch.gather(rows), ...), weight)`
    (`moe_ops::routed_swiglu`, csrc/swiglu_ffn_cpu.cpp: each thread gathers a group's rows into
    its own buffer before the products, and the backward takes the combine weights' gradient
    from h, so neither the permuted rows nor the expert outputs are kept). Every float dtype on
    CPU with the compiled kernels (whole 16-row blocks in half precision, as `grouped_swiglu`);
    None elsewhere."""
    if not _compiled or not all(applies(rows, w) for w in (w13, w2)):
        return None
    return torch.ops.moe_ops.routed_swiglu(
        rows.contiguous(), w13, w2, dispatch.order, dispatch.inverse,
        weight.reshape(-1).float().contiguous(), dispatch.offsets.tolist(), dispatch.k,
        FFN_BLOCK)


def split_grouped_linear(x: torch.Tensor, weight: torch.Tensor,
                         offsets: torch.Tensor) -> torch.Tensor:
    """`SplitGroupedMM`; with the compiled kernels the same products as one op whose autograd is
    C++ (`moe_ops::group_mm`, csrc/autograd.cpp), without a Python node per call."""
    if _compiled:
        return torch.ops.moe_ops.group_mm(x.contiguous(), weight, offsets.tolist(),
                                          block_rows(x.dtype))
    return SplitGroupedMM.apply(x.contiguous(), weight, spans_of(offsets))
