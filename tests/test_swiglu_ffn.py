"""The fused grouped SwiGLU FFN kernels (csrc/swiglu_ffn_cpu.cpp) against the per-group loop:
every step run piece by piece per thread, with groups cut between threads, empty groups, rows
past the last group, and gradients asked for in any combination; on exact rows and on whole
16- and 64-row blocks (half precision's products; checked in float64 here, where the loop is
exact). The gate and up weights are one (G, D, 2H) tensor w13 = [w1 | w3]; the loop runs them
as two products."""

import itertools

import pytest
import torch

from moe import ops
from moe.grouping import grouped_linear_reference

needs_kernels = pytest.mark.skipif(not ops.AVAILABLE,
                                   reason="moe._C was not built (needs a C++ compiler)")

SIZES = [
    [100, 90, 110, 95],        # cut between threads inside a group
    [2100, 64, 63],            # one group over most of the rows
    [70, 0, 3, 130, 1],        # empty and one-row groups
    [0, 0, 0],                 # no rows at all
    [300],                     # one group over every thread
    [1, 2, 3, 5, 8, 13, 21, 34, 55, 89],
    [4500, 10],                # a group over several 2048-row products of one thread
]


def case(sizes, dtype=torch.float64, d=24, hidden=40, d_out=16, extra_rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, n = len(sizes), sum(sizes) + extra_rows
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w13 = torch.randn(G, d, 2 * hidden, generator=g, dtype=torch.float64) / d ** 0.5
    w2 = torch.randn(G, hidden, d_out, generator=g, dtype=torch.float64) / hidden ** 0.5
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [t.to(dtype) for t in (x, w13, w2)], ends


def loop(x, w13, w2, ends):
    """Forward (y, [gate | up]) on the groups' rows, group by group, gate and up apart."""
    offsets = torch.tensor(ends)
    w1, w3 = w13.chunk(2, dim=-1)
    gate = grouped_linear_reference(x, w1, offsets)
    up = grouped_linear_reference(x, w3, offsets)
    y = grouped_linear_reference(torch.nn.functional.silu(gate) * up, w2, offsets)
    return y, torch.cat([gate, up], dim=-1)


@needs_kernels
@pytest.mark.parametrize("block", [1, 16, 64])
@pytest.mark.parametrize("sizes", SIZES)
def test_fused_forward_and_backward_equal_the_loop(sizes, block, threads):
    (x, w13, w2), ends = case(sizes)
    n = ends[-1]
    x[n:] = float("nan")  # rows past the groups are never read
    y, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends, block)
    inputs = [t.clone().requires_grad_() for t in (x, w13, w2)]
    ry, rgate_up = loop(inputs[0][:n], *inputs[1:], ends)
    for got, want in ((y, ry), (gate_up, rgate_up)):
        torch.testing.assert_close(got[:n], want.detach(), rtol=1e-12, atol=1e-12)
        assert torch.equal(got[n:], got.new_zeros(got.shape[0] - n, got.shape[1]))
    grad = torch.randn_like(y)
    grad[n:] = float("nan")
    got = torch.ops.moe_ops.grouped_swiglu_backward(grad, x, w13, w2, gate_up, ends, [1, 1, 1],
                                                    block)
    want = torch.autograd.grad(ry, inputs, grad[:n], allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(inputs, want)]
    want[0] = torch.cat([want[0][:n], want[0].new_zeros(x.shape[0] - n, x.shape[1])])
    for g, w in zip(got, want):  # x's gradient is zero past the groups, empty groups' zero
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("block", [1, 16, 64])
def test_fused_backward_computes_exactly_what_is_asked(block):
    # every combination of frozen inputs: the asked gradients are the full call's, bit for bit
    # (the same products in the same order), the others empty
    (x, w13, w2), ends = case([100, 90, 110, 95])
    _, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends, block)
    grad = torch.randn(x.shape[0], w2.shape[2], dtype=x.dtype)
    full = torch.ops.moe_ops.grouped_swiglu_backward(grad, x, w13, w2, gate_up, ends, [1, 1, 1],
                                                     block)
    for needs in itertools.product([0, 1], repeat=3):
        got = torch.ops.moe_ops.grouped_swiglu_backward(grad, x, w13, w2, gate_up, ends,
                                                        list(needs), block)
        for need, g, f in zip(needs, got, full):
            if need:
                assert torch.equal(g, f), needs
            else:
                assert g.numel() == 0, needs


@needs_kernels
def test_float32_kernels_match_a_float64_loop():
    (x, w13, w2), ends = case([300, 200, 250], torch.float32, d=64, hidden=96, d_out=64)
    n = ends[-1]
    y, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends)
    inputs = [t.double().requires_grad_() for t in (x, w13, w2)]
    ry, _ = loop(inputs[0][:n], *inputs[1:], ends)
    torch.testing.assert_close(y[:n].double(), ry.detach(), rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.ops.moe_ops.grouped_swiglu_backward(grad, x, w13, w2, gate_up, ends, [1, 1, 1])
    want = torch.autograd.grad(ry, inputs, grad[:n].double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_bfloat16_kernels_match_a_float64_loop():
    # half precision: whole 16-row blocks (the kernels' choice for bfloat16), the products'
    # rounding against the exact loop
    (x, w13, w2), ends = case([300, 0, 200, 37, 250], torch.bfloat16, d=64, hidden=96, d_out=64)
    n = ends[-1]
    y, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends)
    inputs = [t.double().requires_grad_() for t in (x, w13, w2)]
    ry, rgate_up = loop(inputs[0][:n], *inputs[1:], ends)
    torch.testing.assert_close(gate_up[:n].double(), rgate_up.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y[:n].double(), ry.detach(), rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(y)
    got = torch.ops.moe_ops.grouped_swiglu_backward(grad, x, w13, w2, gate_up, ends, [1, 1, 1])
    want = torch.autograd.grad(ry, inputs, grad[:n].double())  # x's: zero past the groups
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        scale = w.abs().max()
        assert (g.double() - w).abs().max() <= 2e-2 * scale


@needs_kernels
@pytest.mark.parametrize("block", [1, 16, 64])
def test_grouped_swiglu_op_takes_the_fused_kernels(block):
    # the differentiable op saves gate_up, not h, and its gradients equal the fused backward's
    (x, w13, w2), ends = case([100, 0, 150])
    inputs = [t.clone().requires_grad_() for t in (x, w13, w2)]
    y = torch.ops.moe_ops.grouped_swiglu(*inputs, ends, block)
    fy, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends, block)
    assert torch.equal(y.detach(), fy)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.ops.moe_ops.grouped_swiglu_backward(grad, x, w13, w2, gate_up, ends, [1, 1, 1],
                                                     block)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_pass_opcheck(dtype):
    (x, w13, w2), ends = case([70, 5, 0, 30], dtype)
    y, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends)
    grad = torch.randn_like(y)
    torch.library.opcheck(torch.ops.moe_ops.grouped_swiglu_forward, (x, w13, w2, ends))
    for needs in ([1, 1, 1], [1, 0, 1], [0, 1, 0]):
        torch.library.opcheck(torch.ops.moe_ops.grouped_swiglu_backward,
                              (grad, x, w13, w2, gate_up, ends, needs))


@needs_kernels
def test_fused_kernels_reject_bad_input():
    (x, w13, w2), ends = case([10, 20])
    with pytest.raises(RuntimeError, match="bfloat16 or float16 tensor"):
        torch.ops.moe_ops.grouped_swiglu_forward(x.int(), w13, w2, ends)
    with pytest.raises(RuntimeError, match="weights must be of x's dtype"):
        torch.ops.moe_ops.grouped_swiglu_forward(x.bfloat16(), w13, w2, ends)
    with pytest.raises(RuntimeError, match="block must be 0"):
        torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends, -1)
    with pytest.raises(RuntimeError, match="w2 must be"):
        torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2[:, :5], ends)
    with pytest.raises(RuntimeError, match="w13 must be"):
        torch.ops.moe_ops.grouped_swiglu_forward(x, w13[..., :-1], w2, ends)  # odd width
    with pytest.raises(RuntimeError, match="ends must be non-decreasing"):
        torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, [20, 10])
    y, gate_up = torch.ops.moe_ops.grouped_swiglu_forward(x, w13, w2, ends)
    with pytest.raises(RuntimeError, match="needs must hold 3 flags"):
        torch.ops.moe_ops.grouped_swiglu_backward(torch.ones_like(y), x, w13, w2, gate_up, ends,
                                                  [1, 1])
    with pytest.raises(RuntimeError, match="gate_up must be"):
        torch.ops.moe_ops.grouped_swiglu_backward(torch.ones_like(y), x, w13, w2,
                                                  gate_up[:, :-2].contiguous(), ends, [1, 1, 1])
