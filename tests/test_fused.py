"""The fused kernels of csrc/fused_cpu.cpp and csrc/router_cpu.cpp against their references:
values and gradients against float64 autograd, dtypes, vector tails, registration."""

import pytest
import torch

from moe import fused, ops
from moe.routing import router_scores, topk_route

needs_kernels = pytest.mark.skipif(not ops.AVAILABLE, reason="moe._C was not built "
                                   "(needs a C++ compiler at install time)")
HALF = (torch.bfloat16, torch.float16)


def tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype in HALF else dict(atol=1e-5, rtol=1e-5)


def leaf(t, dtype=None):
    return t.to(dtype or t.dtype).detach().requires_grad_()


def grads_against_float64(fast, ref, inputs, dtype, grad_dtype=None):
    """Run `fast` on inputs (cast to dtype) and `ref` on float64 copies; compare outputs and the
    gradients of every floating input under the same random output gradient."""
    ins = [leaf(t, dtype if t.is_floating_point() and dtype is not None else None)
           if isinstance(t, torch.Tensor) else t for t in inputs]
    ref_ins = [leaf(t.double()) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
               for t in ins]
    y, want = fast(*ins), ref(*ref_ins)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(g)
    want.backward(g.double())  # the same (rounded) gradient for both
    torch.testing.assert_close(y.double(), want, **tol(y.dtype))
    for a, b in zip(ins, ref_ins):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert a.grad.dtype == a.dtype
            torch.testing.assert_close(a.grad.double(), b.grad, **tol(a.dtype))
    return y


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("D", [1, 31, 33, 100, 1024])
def test_rms_norm_matches_reference(dtype, D):
    g = torch.Generator().manual_seed(D)
    x, w = torch.randn(37, D, generator=g), torch.randn(D, generator=g)
    y = grads_against_float64(lambda x, w: fused.rms_norm(x, w, 1e-5),
                              lambda x, w: torch.nn.functional.rms_norm(x, (D,), w, 1e-5),
                              [x, w], dtype)
    assert y.dtype == dtype


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rms_norm_uses_each_groups_weight(dtype):
    # rows of (N, heads, hd) in groups of 3, 0 (empty), 5 and 1 tokens: 4 heads per token
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 4, 16, generator=g), torch.randn(4, 16, generator=g)
    tokens = [3, 0, 5, 1]

    def ref(x, w):  # one rms_norm per group, by its own weight row
        parts = x.split(tokens)
        return torch.cat([torch.nn.functional.rms_norm(p, (16,), w[i], 1e-6)
                          for i, p in enumerate(parts)])

    grads_against_float64(lambda x, w: fused.rms_norm(x, w, 1e-6, [4 * t for t in tokens]), ref,
                          [x, w], dtype)


@needs_kernels
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rms_norm_half_rows_with_float32_weight():
    # autocast: bfloat16 activations, float32 parameters; the result keeps the rows' dtype
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(20, 64, generator=g).bfloat16(), torch.randn(64, generator=g)
    xl, wl = leaf(x), leaf(w)
    y = fused.rms_norm(xl, wl, 1e-5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert wl.grad.dtype == torch.float32 and xl.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (64,), w, 1e-5), **tol(y.dtype))


@needs_kernels
def test_rms_norm_checks_its_groups():
    x, w = torch.randn(6, 8), torch.ones(2, 8)
    with pytest.raises(RuntimeError, match="group_rows must sum"):
        fused.rms_norm(x, w, 1e-5, [2, 3])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 192)])
def test_swiglu_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape, generator=g) * 4, torch.randn(shape, generator=g)
    grads_against_float64(fused.swiglu, fused.swiglu_reference, [a, b], dtype)


@needs_kernels
def test_swiglu_saturates_at_extreme_gates():
    # the kernel's exp clamps its input; silu must still be exact at the ends and finite
    a = torch.tensor([-1e4, -200.0, -90.0, -87.5, -20.0, 0.0, 20.0, 88.5, 200.0, 1e4])
    b = torch.ones_like(a)
    al, bl = leaf(a), leaf(b)
    y = fused.swiglu(al, bl)
    y.sum().backward()
    want = torch.nn.functional.silu(a.double())
    torch.testing.assert_close(y.double(), want, atol=1e-30, rtol=1e-6)
    assert torch.isfinite(al.grad).all() and torch.isfinite(bl.grad).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_matches_reference_on_strided_input(dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 4 * 8, generator=g)
    angles = torch.randn(2, 5, 1, 4, generator=g)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def run(rotate):
        def f(qkv):  # q is a strided view of the fused projection, as in the attention
            q = qkv.split(32, dim=-1)[0].view(2, 5, 4, 8)
            return rotate(q, cos.to(qkv.dtype), sin.to(qkv.dtype))
        return f

    grads_against_float64(run(fused.rotary), run(fused.rotary_reference), [qkv], dtype)


@needs_kernels
def test_rotary_promotes_like_the_reference():
    # bfloat16 q with float32 angles gives float32, as the reference's type promotion does
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 8, generator=g).bfloat16()
    angles = torch.randn(1, 3, 1, 8, generator=g)
    xl = leaf(x)
    y = fused.rotary(xl, angles.cos(), angles.sin())
    want = fused.rotary_reference(x, angles.cos(), angles.sin())
    assert y.dtype == want.dtype == torch.float32
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert xl.grad.dtype == torch.bfloat16


def route_reference(logits, k, renormalize, sigmoid, bias):
    scores = router_scores(logits, "sigmoid" if sigmoid else "softmax")
    expert, weight = topk_route(scores, k, renormalize, bias)
    probs = scores / scores.sum(-1, keepdim=True).clamp(min=1e-20) if sigmoid else scores
    return (scores, expert, weight, logits.float().logsumexp(-1), probs.sum(0),
            torch.special.entr(probs).sum())


@needs_kernels
@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_router_topk_matches_reference(sigmoid, renormalize, with_bias, k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(50, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g) * 0.2 if with_bias else None
    fast, slow = leaf(logits), leaf(logits)
    got = fused.router_topk(fast, k, renormalize, sigmoid, bias)
    want = route_reference(slow, k, renormalize, sigmoid, bias)
    assert torch.equal(got[1], want[1])
    # scores, weights, lse, probability sums, entropy
    for i in (0, 2, 3, 4, 5):
        assert got[i].dtype == torch.float32
        torch.testing.assert_close(got[i], want[i].float(), atol=1e-5, rtol=1e-5)
    assert not got[5].requires_grad  # a statistic
    grads = [torch.randn(o.shape, generator=g) for o in want[:5]]
    for outs in (got, want):
        sum((o * w).sum() for i, (o, w) in enumerate(zip(outs, grads)) if i != 1).backward()
    # both compute in float32 (the router's precision), summing in different orders
    torch.testing.assert_close(fast.grad, slow.grad, atol=1e-5, rtol=1e-5)
    assert fast.grad.dtype == torch.float64


@needs_kernels
def test_router_softmax_over_a_wide_range_of_logits():
    # the kernel's own exp (a polynomial after range reduction) against torch's softmax: logits
    # 60 apart, some 100 below their row's largest (past exp's float range), and -inf
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 8, generator=g) * 30
    logits[::7, 3] = logits[::7].max(dim=-1).values - 100
    logits[::11, 5] = float("-inf")
    scores, _, _, lse, prob_sum, entropy = fused.router_topk(logits, 2, True, False)
    want = logits.double().softmax(-1)
    torch.testing.assert_close(scores.double(), want, rtol=2e-6, atol=1e-12)
    assert bool((scores[::11, 5] == 0).all())
    torch.testing.assert_close(lse.double(), logits.double().logsumexp(-1))
    torch.testing.assert_close(prob_sum.double(), want.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), torch.special.entr(want).sum(), rtol=1e-4,
                               atol=1e-3)


@needs_kernels
def test_router_topk_gradient_through_weights_only():
    # only the combine weights used (no balance loss): the scores get no gradient of their own
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 6, generator=g)
    fast, slow = leaf(logits), leaf(logits)
    fused.router_topk(fast, 2, True, False)[2].pow(2).sum().backward()
    route_reference(slow, 2, True, False, None)[2].pow(2).sum().backward()
    torch.testing.assert_close(fast.grad, slow.grad)


@needs_kernels
def test_router_topk_renormalising_sum_clamped():
    # sigmoid scores that underflow: the reference clamps the sum at 1e-20, so does the kernel
    logits = torch.tensor([[-200.0, -210.0, -220.0], [1.0, 2.0, -1.0]])
    fast, slow = leaf(logits), leaf(logits)
    got = fused.router_topk(fast, 2, True, True)
    want = route_reference(slow, 2, True, True, None)
    torch.testing.assert_close(got[2], want[2])
    got[2].sum().backward()
    want[2].sum().backward()
    torch.testing.assert_close(fast.grad, slow.grad)


@needs_kernels
def test_fused_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    m = torch.ops.moe_ops
    x, w = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g)
    torch.library.opcheck(m.rms_norm, (x, w, [2, 4], 1e-5))
    y, rstd = m.rms_norm(x, w, [2, 4], 1e-5)
    torch.library.opcheck(m.rms_norm_backward, (torch.randn_like(x), x, w, rstd, [2, 4]))
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.library.opcheck(m.swiglu, (a, b))
    torch.library.opcheck(m.swiglu_backward, (torch.randn_like(a), a, b))
    q = torch.randn(2, 3, 2, 8, generator=g)
    cos, sin = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    torch.library.opcheck(m.rotary, (q, cos, sin, False))
    logits = torch.randn(10, 4, generator=g)
    torch.library.opcheck(m.router_topk, (logits, None, 2, True, False))
    torch.library.opcheck(m.router_topk, (logits, torch.zeros(4), 1, False, True))


@needs_kernels
def test_fused_ops_take_empty_inputs():
    # no rows (an absent modality, an empty batch): empty outputs, zero weight gradients
    x, w = leaf(torch.randn(0, 16)), leaf(torch.randn(3, 16))
    y = fused.rms_norm(x, w, 1e-5, [0, 0, 0])
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(3, 16))
    a, b = leaf(torch.randn(0, 8)), leaf(torch.randn(0, 8))
    fused.swiglu(a, b).sum().backward()
    assert a.grad.shape == (0, 8)
    q, angles = leaf(torch.randn(2, 0, 3, 8)), torch.randn(2, 0, 1, 8)
    fused.rotary(q, angles.cos(), angles.sin()).sum().backward()
    assert q.grad.shape == (2, 0, 3, 8)
    m = torch.ops.moe_ops
    assert m.group_rows_mm(torch.randn(0, 4), torch.randn(2, 4, 3), [0, 0], True).shape == (0, 3)
    assert torch.equal(m.group_inner_mm(torch.randn(0, 4), torch.randn(0, 3), [0, 0], True),
                       torch.zeros(2, 4, 3))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,hidden", [(0, 8), (1, 1), (37, 24), (300, 64)])
def test_swiglu_halves_equal_swiglu_on_the_two_halves(dtype, rows, hidden):
    # gate and up side by side in one (M, 2H) tensor: the same values as swiglu of the halves,
    # and the backward writes both gradients side by side, bit for bit those of swiglu_backward
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(rows, 2 * hidden, generator=g) * 3).to(dtype)
    grad = torch.randn(rows, hidden, generator=g).to(dtype)
    gate, up = (t.contiguous() for t in gate_up.chunk(2, dim=-1))
    h = torch.ops.moe_ops.swiglu_halves(gate_up)
    assert torch.equal(h, torch.ops.moe_ops.swiglu(gate, up))
    ga, gb = torch.ops.moe_ops.swiglu_backward(grad, gate, up)
    assert torch.equal(torch.ops.moe_ops.swiglu_halves_backward(grad, gate_up),
                       torch.cat([ga, gb], dim=-1))
    torch.testing.assert_close(h.double(), fused.swiglu_halves_reference(gate_up.double()),
                               **tol(dtype))
    torch.library.opcheck(torch.ops.moe_ops.swiglu_halves, (gate_up,))
    torch.library.opcheck(torch.ops.moe_ops.swiglu_halves_backward, (grad, gate_up))


@needs_kernels
def test_swiglu_halves_reject_bad_input():
    with pytest.raises(RuntimeError, match="gate_up must be a contiguous"):
        torch.ops.moe_ops.swiglu_halves(torch.ones(4, 5))  # odd width
    with pytest.raises(RuntimeError, match="grad must be a contiguous"):
        torch.ops.moe_ops.swiglu_halves_backward(torch.ones(4, 3), torch.ones(4, 4))
