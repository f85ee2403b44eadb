"""The routed SwiGLU FFN (csrc/swiglu_ffn_cpu.cpp): an MoE's gather, grouped experts and
weighted combine in one op, against the separate steps in float64 (the dispatch's row layout,
the per-group loop, the weighted sum per token), dropless and with dropped slots, at 1-3
threads, on exact rows and on whole 16- and 64-row blocks (half precision's products), with
gradients asked for in any combination; bfloat16 against float64; and the MoE block taking
it."""

import itertools

import pytest
import torch

from moe import MoE, MoEConfig, cpu_gemm, ops
from moe.dispatch import TopKDispatch
from moe.grouping import grouped_linear_reference

needs_kernels = pytest.mark.skipif(not ops.AVAILABLE,
                                   reason="moe._C was not built (needs a C++ compiler)")

# (tokens, experts, k, capacity): dropless, capacity with dropped slots (some tokens lose every
# slot), k = 1 and 4, more experts than are chosen (empty groups), no tokens
CASES = [(300, 4, 2, None), (300, 4, 2, 90), (200, 5, 1, 30), (150, 6, 4, None),
         (64, 9, 2, None), (0, 4, 2, None)]


def case(N, E, k, capacity, dtype=torch.float64, d=24, hidden=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, d, 2 * hidden, generator=g, dtype=torch.float64) / d ** 0.5
    w2 = torch.randn(E, hidden, d, generator=g, dtype=torch.float64) / hidden ** 0.5
    # skewed choices, so that some groups are large and others empty or small
    scores = torch.randn(N, E, generator=g) + torch.linspace(1.5, -1.5, E)
    expert = scores.topk(k, dim=-1).indices
    weights = torch.rand(N * k, generator=g)  # float32, as the combine takes them
    dispatch = TopKDispatch(expert, E, capacity)
    return [t.to(dtype) for t in (x, w13, w2)], weights, dispatch


def reference(x, w13, w2, weights, d):
    """The separate steps: the kept slots' token rows in the dispatch's order, the per-group
    loop (gate and up apart), then per token the weighted sum of its kept slots' outputs."""
    token = d.order[:d.kept] // d.k
    rows = x.index_select(0, token)
    w1, w3 = w13.chunk(2, dim=-1)
    gate = grouped_linear_reference(rows, w1, d.offsets)
    up = grouped_linear_reference(rows, w3, d.offsets)
    out = grouped_linear_reference(torch.nn.functional.silu(gate) * up, w2, d.offsets)
    slot = d.order[:d.kept]
    y = torch.zeros(x.shape[0], w2.shape[2], dtype=out.dtype)
    y = y.index_add(0, token, out * weights[slot, None].to(out.dtype))
    return y, torch.cat([gate, up], dim=-1)


def call(x, w13, w2, weights, d):
    return torch.ops.moe_ops.routed_swiglu(x, w13, w2, d.order, d.inverse, weights,
                                           d.offsets.tolist(), d.k)


@needs_kernels
@pytest.mark.parametrize("block", [1, 16, 64])
@pytest.mark.parametrize("N,E,k,capacity", CASES)
def test_routed_ffn_equals_the_separate_steps(N, E, k, capacity, block, threads):
    (x, w13, w2), weights, d = case(N, E, k, capacity)
    if capacity is not None:
        assert d.dropped > 0 and not bool(d.keep.any(dim=1).all())  # tokens with no slot
    y, gate_up = torch.ops.moe_ops.routed_swiglu_forward(
        x, w13, w2, d.order, d.inverse, weights, d.offsets.tolist(), k, block)
    inputs = [t.clone().requires_grad_() for t in (x, w13, w2)]
    w64 = weights.double().requires_grad_()
    ry, rgate_up = reference(*inputs, w64, d)
    for got, want in ((y, ry), (gate_up, rgate_up)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    got = torch.ops.moe_ops.routed_swiglu_backward(
        grad, x, w13, w2, gate_up, d.order, d.inverse, weights, d.offsets.tolist(), k,
        [1, 1, 1, 1], block)
    want = torch.autograd.grad(ry, inputs + [w64], grad, allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(inputs + [w64], want)]
    gx, gw, g13, g2 = got
    for g, w in zip((gx, g13, g2), want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # the combine weights' gradient, float32 as the weights are (0 for a dropped slot)
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, want[3].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(gw[~d.keep.reshape(-1)], gw.new_zeros(d.dropped))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_routed_backward_computes_exactly_what_is_asked(dtype):
    # every combination of inputs wanting no gradient: the asked ones are the full call's, bit
    # for bit, the others empty
    (x, w13, w2), weights, d = case(300, 4, 2, 90, dtype)
    args = (d.order, d.inverse, weights, d.offsets.tolist(), 2)
    _, gate_up = torch.ops.moe_ops.routed_swiglu_forward(x, w13, w2, *args)
    grad = torch.randn(x.shape[0], w2.shape[2], dtype=x.dtype)
    full = torch.ops.moe_ops.routed_swiglu_backward(grad, x, w13, w2, gate_up, *args, [1] * 4)
    for needs in itertools.product([0, 1], repeat=4):
        got = torch.ops.moe_ops.routed_swiglu_backward(grad, x, w13, w2, gate_up, *args,
                                                       list(needs))
        for g, f, need in zip(got, full, needs):
            assert torch.equal(g, f) if need else g.numel() == 0


@needs_kernels
def test_float32_routed_ffn_matches_float64():
    (x, w13, w2), weights, d = case(300, 4, 2, None)
    inputs32 = [t.float().requires_grad_() for t in (x, w13, w2)]
    w32 = weights.clone().requires_grad_()
    inputs64 = [t.clone().requires_grad_() for t in (x, w13, w2)]
    w64 = weights.clone().requires_grad_()
    y32, y64 = call(*inputs32, w32, d), call(*inputs64, w64, d)
    torch.testing.assert_close(y32, y64.float(), rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(y64)
    g32 = torch.autograd.grad(y32, inputs32 + [w32], grad.float())
    g64 = torch.autograd.grad(y64, inputs64 + [w64], grad)
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_bfloat16_routed_ffn_matches_float64():
    # bfloat16 on 16-row blocks (its own choice) against float64 on the same rounded inputs:
    # every result within 2 % of the largest reference value (the products round to bfloat16)
    (x, w13, w2), weights, d = case(300, 4, 2, None, d=64, hidden=96)
    inputs = [t.bfloat16().requires_grad_() for t in (x, w13, w2)]
    w16 = weights.clone().requires_grad_()
    inputs64 = [t.bfloat16().double().requires_grad_() for t in (x, w13, w2)]
    w64 = weights.clone().requires_grad_()
    y, y64 = call(*inputs, w16, d), call(*inputs64, w64, d)
    assert y.dtype == torch.bfloat16
    assert (y.double() - y64).abs().max() <= 2e-2 * y64.abs().max()
    grad = torch.randn_like(y64)
    got = torch.autograd.grad(y, inputs + [w16], grad.bfloat16())
    want = torch.autograd.grad(y64, inputs64 + [w64], grad)
    assert [g.dtype for g in got] == [torch.bfloat16] * 3 + [torch.float32]
    for a, b in zip(got, want):
        assert (a.double() - b.double()).abs().max() <= 2e-2 * b.abs().max()


@needs_kernels
def test_routed_op_is_differentiable_and_passes_opcheck():
    (x, w13, w2), weights, d = case(200, 5, 1, 30)
    args = (d.order, d.inverse, weights, d.offsets.tolist(), 1)
    leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
    # (the float32 combine weights' gradient is checked against float64 autograd above)
    assert torch.autograd.gradcheck(lambda *t: call(*t, weights, d), leaves)
    torch.library.opcheck(torch.ops.moe_ops.routed_swiglu, (x, w13, w2, *args))
    torch.library.opcheck(torch.ops.moe_ops.routed_swiglu_forward, (x, w13, w2, *args))
    _, gate_up = torch.ops.moe_ops.routed_swiglu_forward(x, w13, w2, *args)
    grad = torch.randn(x.shape[0], w2.shape[2], dtype=x.dtype)
    torch.library.opcheck(torch.ops.moe_ops.routed_swiglu_backward,
                          (grad, x, w13, w2, gate_up, *args, [1, 0, 1, 0]))


@needs_kernels
def test_routed_op_rejects_bad_input():
    (x, w13, w2), weights, d = case(64, 4, 2, None)
    ends = d.offsets.tolist()
    op = torch.ops.moe_ops.routed_swiglu_forward
    bad_order = d.order.clone()
    bad_order[3] = 10 ** 6
    with pytest.raises(RuntimeError, match="is not a slot"):
        op(x, w13, w2, bad_order, d.inverse, weights, ends, 2)
    with pytest.raises(RuntimeError, match="weights must be"):
        op(x, w13, w2, d.order, d.inverse, weights.double(), ends, 2)
    with pytest.raises(RuntimeError, match="k must divide"):
        op(x, w13, w2, d.order, d.inverse, weights, ends, 3)
    with pytest.raises(RuntimeError, match="must not pass"):
        op(x, w13, w2, d.order, d.inverse, weights, ends[:-1] + [10 ** 6], 2)


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("capacity_factor", [None, 0.8])
def test_moe_block_takes_the_routed_op_and_matches_the_loop(capacity_factor, dtype, tol,
                                                            monkeypatch):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=32, hidden=48, num_experts=4, top_k=2, capacity_factor=capacity_factor)
    block = MoE(cfg).to(dtype)
    loop = MoE(MoEConfig(**{**cfg.__dict__, "implementation": "loop"})).to(dtype)
    loop.load_state_dict(block.state_dict())
    x = torch.randn(2, 50, 32, dtype=dtype)
    calls = []
    original = cpu_gemm.routed_swiglu

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(cpu_gemm, "routed_swiglu", counted)
    y = block(x)
    assert calls, "the block should run the routed op"
    want = loop(x)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    params = list(block.parameters())
    got = torch.autograd.grad(y.float().square().sum(), params)
    ref = torch.autograd.grad(want.float().square().sum(), list(loop.parameters()))
    for g, r in zip(got, ref):
        if dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
        else:  # both round their products to bfloat16, in different orders
            assert (g.double() - r.double()).abs().max() <= tol * r.abs().max()
