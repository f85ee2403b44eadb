"""The CPU grouped GEMM (whole 64-row blocks in half precision, exact rows otherwise) against the
per-group loop."""

import pytest
import torch

from moe import cpu_gemm, ops
from moe.cpu_gemm import BLOCK, SplitGroupedMM, applies, spans_of
from moe.grouping import grouped_linear, grouped_linear_reference

needs_kernels = pytest.mark.skipif(not ops.AVAILABLE, reason="moe._C was not built "
                                   "(needs a C++ compiler at install time)")

# group sizes that exercise every branch: empty groups, a single row, exact blocks, a block
# plus one, a small group whose neighbour's spill crosses it, a short last group, a last group
# whose blocks end at the buffer's end and start back inside the two groups before it
SIZES = [
    [0, 1, 0],
    [30, 20, 100],
    [BLOCK, BLOCK - 1, BLOCK + 1],
    [70, 5, 3, 130],
    [200],
    [3, 0, 0, 2],
    [130, 0, 60, 1],
    [100, 90, 110, 95],  # balanced: shared out among the threads
    [70, 65, 0, 66, 64, 71, 63, 1],
]


def case(sizes, dtype, d_in=24, d_out=40, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes) + extra_rows
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(len(sizes), d_in, d_out, generator=g, dtype=torch.float64).to(dtype)
    w.requires_grad_()
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return x, w, offsets


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "python"])
@pytest.mark.parametrize("sizes", SIZES)
def test_blocked_products_equal_the_per_group_loop(sizes, compiled, monkeypatch):
    if compiled and not ops.AVAILABLE:
        pytest.skip("moe._C was not built (needs a C++ compiler at install time)")
    monkeypatch.setattr(cpu_gemm, "_compiled", compiled)
    x, w, offsets = case(sizes, torch.float64)
    y = SplitGroupedMM.apply(x, w, spans_of(offsets))
    ref = grouped_linear_reference(x, w, offsets)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [[70, 5], [70, 75]])
def test_rows_past_the_last_group_are_zero_both_ways(sizes):
    x, w, offsets = case(sizes, torch.float64, extra_rows=9)
    n = sum(sizes)
    y = SplitGroupedMM.apply(x, w, spans_of(offsets))
    assert y.shape == (n + 9, 40)
    assert torch.equal(y[n:], torch.zeros(9, 40, dtype=torch.float64))
    torch.testing.assert_close(y[:n], grouped_linear_reference(x, w, offsets))
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx[n:], torch.zeros(9, 24, dtype=torch.float64))


@needs_kernels
@pytest.mark.parametrize("block", [BLOCK, 1], ids=["blocks", "exact"])
@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("sizes", SIZES + [[2100, 5]])  # + a group over one 2048-row chunk
def test_group_kernels_equal_the_loop_shared_out_or_not(sizes, spread, block):
    # spread=True shares balanced groups out among the threads, unbalanced ones run in turn;
    # block 64 is what half precision runs, block 1 (exact rows) what float32 runs
    x, w, offsets = case(sizes, torch.float64, extra_rows=5)
    ends = offsets.tolist()
    m = torch.ops.moe_ops
    ref = grouped_linear_reference(x, w, offsets)
    ref = torch.cat([ref, ref.new_zeros(5, ref.shape[1])])  # rows past the groups: zero
    torch.testing.assert_close(m.group_rows_mm(x.detach(), w.detach(), ends, spread, block), ref,
                               rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(m.group_rows_mm(g, w.detach().transpose(1, 2), ends, spread,
                                               block), rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.group_inner_mm(x.detach(), g, ends, spread, block), rw,
                               rtol=1e-12, atol=1e-12)


@needs_kernels
def test_group_kernels_reject_a_block_below_one():
    x, w, offsets = case([3, 4], torch.float32)
    with pytest.raises(RuntimeError, match="block must be at least 1"):
        torch.ops.moe_ops.group_rows_mm(x.detach(), w.detach(), offsets.tolist(), True, 0)
    with pytest.raises(RuntimeError, match="block must be at least 1"):
        torch.ops.moe_ops.group_inner_mm(x.detach(), x.detach(), offsets.tolist(), True, 0)


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


@pytest.mark.parametrize("compiled", [True, False], ids=["kernels", "python"])
def test_which_products_take_the_split_path(compiled, monkeypatch):
    # half precision always (blocks); float32 / float64 only with the compiled kernels (exact
    # rows shared out among the threads), else torch's grouped_mm or the loop
    monkeypatch.setattr(cpu_gemm, "_compiled", compiled)
    x, w, _ = case([3], torch.float32)
    assert applies(x, w) == compiled
    assert applies(x.double(), w.double()) == compiled
    assert applies(x.bfloat16(), w.bfloat16())
    assert not applies(x.bfloat16(), w)  # mixed dtypes go to the general path
    assert cpu_gemm.block_rows(torch.bfloat16) == BLOCK and cpu_gemm.block_rows(torch.float32) == 1


@needs_kernels
@pytest.mark.parametrize("sizes", [SIZES[3], SIZES[8]])
def test_float32_grouped_linear_equals_the_per_group_loop(sizes):
    x, w, offsets = case(sizes, torch.float32, d_in=64, d_out=96)
    assert applies(x, w)
    y = grouped_linear(x, w, offsets)
    ref = grouped_linear_reference(x, w, offsets)
    grad = torch.randn_like(ref)
    got, want = torch.autograd.grad(y, (x, w), grad), torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("spread", [True, False])
def test_weight_gradient_reads_no_rows_past_the_groups(spread):
    # the partial blocks read neighbouring rows in place against zero rows: rows that belong to
    # no group (here NaN) must not be among them
    x, w, offsets = case([70, 5, 3], torch.float64, extra_rows=60)
    n = int(offsets[-1])
    a, g = x.detach().clone(), torch.randn(n + 60, 40, dtype=torch.float64)
    a[n:], g[n:] = float("nan"), float("nan")
    got = torch.ops.moe_ops.group_inner_mm(a, g, offsets.tolist(), spread)
    want = torch.stack([a[s:e].t() @ g[s:e] for s, e in spans_of(offsets)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("block", [BLOCK, 1])
def test_group_kernels_pass_opcheck(block):
    # schema, fake kernel (shapes for torch.compile) and dispatch agree with the real kernel
    x, w, offsets = case([70, 5, 0, 30], torch.float32, extra_rows=3)
    x, w, ends = x.detach(), w.detach(), offsets.tolist()
    g = torch.randn(x.shape[0], w.shape[2])
    torch.library.opcheck(torch.ops.moe_ops.group_rows_mm, (x, w, ends, True, block))
    torch.library.opcheck(torch.ops.moe_ops.group_rows_mm, (g, w.transpose(1, 2), ends, False,
                                                            block))
    torch.library.opcheck(torch.ops.moe_ops.group_inner_mm, (x, g, ends, True, block))
    # the differentiable composition: its C++ autograd and its kernel below autograd
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.library.opcheck(torch.ops.moe_ops.group_mm, (xg, wg, ends, block))
    torch.library.opcheck(torch.ops.moe_ops.group_mm, (x, wg, ends, block))
    w2 = torch.randn(w.shape[0], w.shape[2] // 2, 16, requires_grad=True)  # w: [w1 | w3]
    torch.library.opcheck(torch.ops.moe_ops.grouped_swiglu, (xg, wg, w2, ends, block))
    torch.library.opcheck(torch.ops.moe_ops.grouped_swiglu, (x, w, w2.detach(), ends, block))


@needs_kernels
@pytest.mark.parametrize("block", [BLOCK, 1], ids=["blocks", "exact"])
@pytest.mark.parametrize("sizes", SIZES)
def test_group_mm_op_equals_the_per_group_loop(sizes, block):
    # forward and both gradients of the op `grouped_linear` runs in float32 / half precision
    x, w, offsets = case(sizes, torch.float64, extra_rows=4)
    y = torch.ops.moe_ops.group_mm(x, w, offsets.tolist(), block)
    n = sum(sizes)
    ref = grouped_linear_reference(x, w, offsets)
    torch.testing.assert_close(y[:n], ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(y[n:], y.new_zeros(4, y.shape[1]))
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad[:n])
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)  # zero past the groups
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
    # a frozen weight: the input's gradient alone
    (gx_only,) = torch.autograd.grad(torch.ops.moe_ops.group_mm(x, w.detach(), offsets.tolist(),
                                                                block), x, grad)
    torch.testing.assert_close(gx_only, gx, rtol=0, atol=0)


def swiglu_loop(x, w1, w3, w2, offsets):
    """The expert FFN group by group: silu(x w1[g]) * (x w3[g]), then w2[g]."""
    h = torch.nn.functional.silu(grouped_linear_reference(x, w1, offsets)) \
        * grouped_linear_reference(x, w3, offsets)
    return grouped_linear_reference(h, w2, offsets)


@needs_kernels
@pytest.mark.parametrize("block", [BLOCK, 1], ids=["blocks", "exact"])
@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_swiglu_op_equals_the_per_group_loop(sizes, block):
    # the whole expert FFN as one op (w13 = [w1 | w3]): forward and all gradients against the
    # loop with gate and up apart, then with parts frozen
    x, w13, offsets = case(sizes, torch.float64, d_out=80, extra_rows=4)
    w2 = torch.randn(len(sizes), 40, 24, dtype=torch.float64, requires_grad=True)
    ends, n = offsets.tolist(), sum(sizes)
    y = torch.ops.moe_ops.grouped_swiglu(x, w13, w2, ends, block)
    ref = swiglu_loop(x, *w13.chunk(2, dim=-1), w2, offsets)
    torch.testing.assert_close(y[:n], ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(y[n:], y.new_zeros(4, 24))
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w13, w2), grad)
    want = torch.autograd.grad(ref, (x, w13, w2), grad[:n])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)  # x's: zero past the groups
    frozen = torch.ops.moe_ops.grouped_swiglu(x, w13, w2.detach(), ends, block)
    gx, gw13 = torch.autograd.grad(frozen, (x, w13), grad)
    torch.testing.assert_close(gx, got[0], rtol=0, atol=0)
    torch.testing.assert_close(gw13, got[1], rtol=0, atol=0)
    (gx_only,) = torch.autograd.grad(torch.ops.moe_ops.grouped_swiglu(x, w13.detach(), w2,
                                                                      ends, block), x, grad)
    torch.testing.assert_close(gx_only, got[0], rtol=0, atol=0)


@needs_kernels
def test_grouped_swiglu_layer_takes_the_op_and_matches_its_loop():
    # GroupedSwiGLU.ffn runs the one op on CPU in float32 and bfloat16 (one autograd node)
    from moe.layers import GroupedSwiGLU

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        layer = GroupedSwiGLU(3, 32, 48).to(dtype)
        offsets = torch.tensor([70, 0, 130]).cumsum(0).to(torch.int32)
        x = torch.randn(200, 32, dtype=dtype, requires_grad=True)
        y = layer.ffn(x, offsets)
        assert "GroupedSwiglu" in y.grad_fn.name()
        torch.testing.assert_close(y.float(), layer.ffn(x, offsets, reference=True).float(),
                                   rtol=tol, atol=tol)


@needs_kernels
def test_float32_grouped_linear_runs_under_torch_compile():
    # the kernels read the group ends on the host (a graph break there); torch's grouped_mm,
    # the path float32 took before, has no float32 meta kernel on CPU and fails to trace
    x, w, offsets = case([70, 5, 30], torch.float32, d_in=32, d_out=48)
    y = torch.compile(grouped_linear, backend="aot_eager")(x, w, offsets)
    ref = grouped_linear_reference(x, w, offsets)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    rx, rw = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
