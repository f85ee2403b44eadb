"""The grouping primitive: permutation bookkeeping and grouped GEMM against the per-group loop."""

import pytest
import torch

from moe.grouping import Grouping, grouped_linear, grouped_linear_reference
from moe.layers import GroupedLinear, GroupedSwiGLU


def test_grouping_hand_worked():
    ids = torch.tensor([2, 0, 2, 1, 0, 2])
    g = Grouping.from_ids(ids, num_groups=4)
    assert g.order.tolist() == [1, 4, 3, 0, 2, 5]  # stable: equal ids keep sequence order
    assert g.position.tolist() == [3, 0, 4, 2, 1, 5]
    assert g.counts.tolist() == [2, 1, 3, 0]  # group 3 is empty
    assert g.offsets.tolist() == [2, 3, 6, 6] and g.offsets.dtype == torch.int32
    x = torch.arange(6.0)[:, None]
    assert g.permute(x).flatten().tolist() == [1, 4, 3, 0, 2, 5]
    assert torch.equal(g.unpermute(g.permute(x)), x)


@pytest.mark.parametrize("layer", [GroupedLinear(3, 8, 12), GroupedSwiGLU(3, 8, 16)])
def test_grouped_layout_equals_sequence_layout(layer):
    ids = torch.randint(0, 3, (2, 9))
    x = torch.randn(2, 9, 8)
    g = Grouping.from_ids(ids, 3, grouped=True)
    assert g.from_sequence(x).shape == (18, 8)
    assert torch.equal(g.sorted_ids, ids.flatten()[g.order])
    out = g.to_sequence(layer(g.from_sequence(x), g))  # rows stay grouped, no gathers inside
    torch.testing.assert_close(out, layer(x, ids), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"grouping rows of shape \(18,\) must match"):
        layer(x, g)


@pytest.mark.parametrize("layout", ["rows", "heads", "strided view", "bfloat16"])
def test_permute_gradient_is_the_inverse_gather(layout):
    # contiguous floating rows take the compiled permute where built, the rest index_select
    ids = torch.randint(0, 3, (50,))
    g = Grouping.from_ids(ids, 3)
    base = torch.randn(50, 4, 6, requires_grad=True)
    x = {"rows": base.view(50, 24), "heads": base, "strided view": base[:, 1:3],
         "bfloat16": base.bfloat16()}[layout]
    w = torch.randn(x.shape).to(x.dtype)
    (g.permute(x) * w).sum().backward()
    ref = base.detach().clone().requires_grad_()
    x_ref = {"rows": ref.view(50, 24), "heads": ref, "strided view": ref[:, 1:3],
             "bfloat16": ref.bfloat16()}[layout]
    (x_ref[g.order] * w).sum().backward()
    assert torch.equal(base.grad, ref.grad)
    assert torch.equal(g.unpermute(g.permute(x)), x)


CASES = {  # name: ids over 3 groups
    "mixed": torch.randint(0, 3, (70,), generator=torch.Generator().manual_seed(1)),
    "absent group": torch.tensor([0, 2, 2, 0, 0, 2, 0] * 5),
    "single token": torch.tensor([1]),
    "all one group": torch.full((33,), 2),
    "empty": torch.zeros(0, dtype=torch.long),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype, dims", [(torch.float32, (16, 24)), (torch.bfloat16, (16, 24)),
                                         (torch.float16, (32, 8)), (torch.float32, (5, 7)),
                                         (torch.float64, (16, 24))])
def test_grouped_linear_equals_loop(case, dtype, dims):
    """Covers the grouped_mm path (aligned float32/bf16/fp16) and the loop fallback
    (rows not 16-byte aligned, float64)."""
    d_in, d_out = dims
    g = Grouping.from_ids(CASES[case], 3)
    x = torch.randn(len(g.ids), d_in, dtype=dtype, requires_grad=True)
    w = torch.randn(3, d_in, d_out, dtype=dtype, requires_grad=True)
    x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
    grad = torch.randn(len(g.ids), d_out, dtype=dtype)
    y = grouped_linear(g.permute(x), w, g.offsets)
    y_ref = grouped_linear_reference(g.permute(x_ref), w_ref, g.offsets)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype in (torch.float32, torch.float64) \
        else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)


def test_grouped_linear_backward_accepts_expanded_gradient():
    g = Grouping.from_ids(torch.randint(0, 3, (40,)), 3)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(3, 16, 16, requires_grad=True)
    grouped_linear(g.permute(x), w, g.offsets).sum().backward()  # d(sum) is a stride-0 tensor
    expected = torch.stack([x.detach()[g.ids == k].sum(0) for k in range(3)])[:, :, None]
    torch.testing.assert_close(w.grad, expected.expand(3, 16, 16))


def test_grouped_swiglu_backward_accepts_expanded_gradient():
    # only its last product keeps the guard: the first two get the gate's fresh gradients
    ffn = GroupedSwiGLU(3, 16, 32)
    g = Grouping.from_ids(torch.randint(0, 3, (40,)), 3)
    x = torch.randn(40, 16, requires_grad=True)
    ffn.ffn(g.permute(x), g.offsets).sum().backward()  # d(sum) is a stride-0 tensor
    x_ref = x.detach().clone().requires_grad_()
    ffn_ref = GroupedSwiGLU(3, 16, 32)
    ffn_ref.load_state_dict(ffn.state_dict())
    ffn_ref.ffn(g.permute(x_ref), g.offsets, reference=True).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for p, p_ref in zip(ffn.parameters(), ffn_ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5)


def test_grouped_swiglu_equals_per_group_ffns():
    ffn = GroupedSwiGLU(3, 16, 32)
    x = torch.randn(2, 11, 16)
    ids = torch.randint(0, 3, (2, 11))
    y = ffn(x, ids)
    for k in range(3):
        xs = x[ids == k]
        ref = (torch.nn.functional.silu(xs @ ffn.w1[k]) * (xs @ ffn.w3[k])) @ ffn.w2[k]
        torch.testing.assert_close(y[ids == k], ref, atol=1e-5, rtol=1e-5)
    expected = torch.bincount(ids.flatten(), minlength=3)
    assert ffn.stats.read()["tokens"].tolist() == expected.tolist()


@pytest.mark.parametrize("ids, message", [
    (None, "routes by group id: pass modality ids"),
    (torch.zeros(2, 5, dtype=torch.long), r"modality ids of shape \(2, 5\) must match"),
    (torch.full((2, 4), 3), r"group ids must be in \[0, 3\), got range \[3, 3\]"),
    (torch.zeros(2, 4), "group ids must be an integer tensor"),
])
def test_bad_group_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        GroupedLinear(3, 8, 8)(torch.randn(2, 4, 8), ids)


def test_grouped_swiglu_loads_state_dicts_with_separate_gate_and_up_weights():
    # w13 holds [w1 | w3]; a state dict saved with separate w1, w3 (G, D, H) loads into it, and
    # the w1 / w3 views read and write w13's halves
    torch.manual_seed(0)
    old = {"w1": torch.randn(3, 8, 5), "w3": torch.randn(3, 8, 5), "w2": torch.randn(3, 5, 8)}
    ffn = GroupedSwiGLU(3, 8, 5)
    ffn.load_state_dict(old)
    assert torch.equal(ffn.w13, torch.cat([old["w1"], old["w3"]], dim=-1))
    assert torch.equal(ffn.w1, old["w1"]) and torch.equal(ffn.w3, old["w3"])
    with torch.no_grad():
        ffn.w3.zero_()
    assert not ffn.w13[..., 5:].any() and torch.equal(ffn.w13[..., :5], old["w1"])
    assert set(ffn.state_dict()) == {"w13", "w2"}
