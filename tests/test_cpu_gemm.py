"""The half-precision CPU grouped GEMM (whole 64-row blocks) against the per-group loop."""

import pytest
import torch

from moe.cpu_gemm import BLOCK, SplitGroupedMM, applies, spans_of
from moe.grouping import grouped_linear, grouped_linear_reference

# group sizes that exercise every branch: empty groups, a single row, exact blocks, a block
# plus one, a small group whose neighbour's spill crosses it, a short last group
SIZES = [
    [0, 1, 0],
    [BLOCK, BLOCK - 1, BLOCK + 1],
    [70, 5, 3, 130],
    [200],
    [3, 0, 0, 2],
    [130, 0, 60, 1],
]


def case(sizes, dtype, d_in=24, d_out=40, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes) + extra_rows
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(len(sizes), d_in, d_out, generator=g, dtype=torch.float64).to(dtype)
    w.requires_grad_()
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return x, w, offsets


@pytest.mark.parametrize("sizes", SIZES)
def test_blocked_products_equal_the_per_group_loop(sizes):
    x, w, offsets = case(sizes, torch.float64)
    y = SplitGroupedMM.apply(x, w, spans_of(offsets))
    ref = grouped_linear_reference(x, w, offsets)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_rows_past_the_last_group_are_zero_both_ways():
    x, w, offsets = case([70, 5], torch.float64, extra_rows=9)
    y = SplitGroupedMM.apply(x, w, spans_of(offsets))
    assert y.shape == (84, 40)
    assert torch.equal(y[75:], torch.zeros(9, 40, dtype=torch.float64))
    torch.testing.assert_close(y[:75], grouped_linear_reference(x, w, offsets))
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx[75:], torch.zeros(9, 24, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", SIZES[1:3])
def test_half_precision_grouped_linear_matches_a_float32_reference(sizes, dtype):
    x, w, offsets = case(sizes, dtype, d_in=64, d_out=96)
    assert applies(x, w)
    y = grouped_linear(x, w, offsets)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = grouped_linear_reference(x32, w32, offsets)
    rx, rw = torch.autograd.grad(ref, (x32, w32), grad.float())
    tol = dict(rtol=2e-2, atol=2e-2 * 8)  # half-precision outputs of length-64 dot products
    torch.testing.assert_close(y.float(), ref, **tol)
    torch.testing.assert_close(gx.float(), rx, **tol)
    torch.testing.assert_close(gw.float(), rw, **tol)


def test_only_half_precision_on_cpu_takes_the_blocked_path():
    x, w, _ = case([3], torch.float32)
    assert not applies(x, w)
    assert applies(x.bfloat16(), w.bfloat16())
    assert not applies(x.bfloat16(), w)  # mixed dtypes go to the general path
