"""The compiled kernels of csrc/ against their PyTorch references, gradients, registration."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from moe import ops

needs_kernels = pytest.mark.skipif(not ops.AVAILABLE, reason="moe._C was not built "
                                   "(needs a C++ compiler at install time)")
CSRC = Path(__file__).parent.parent / "csrc"


def case(N, k, G, capacity, empty_group, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, G - 1 if empty_group else G, (N * k,), generator=g)
    priority = torch.randperm(N * k, generator=g)
    return ids, priority, capacity


CASES = [(N, k, G, cap, empty) for N in (0, 1, 9, 64) for k in (1, 2, 4) for G in (3, 8)
         for cap in (None, 2) for empty in (False, True)]


@needs_kernels
@pytest.mark.parametrize("N, k, G, capacity, empty_group", CASES)
def test_sort_by_group_equals_reference(N, k, G, capacity, empty_group):
    ids, priority, _ = case(N, k, G, capacity, empty_group)
    cap = -1 if capacity is None else capacity
    for pri in (priority, ids.new_empty(0)):
        got = torch.ops.moe_ops.sort_by_group(ids, pri, G, cap)
        want = ops.sort_by_group_reference(ids, pri, G, cap)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_sort_by_group_hand_worked():
    # 3 tokens, k = 2: slots 0..5 with groups below; capacity 1, priority = slot order
    ids = torch.tensor([1, 0, 1, 1, 0, 2])
    order, inverse, counts = ops.sort_by_group_reference(ids, ids.new_empty(0), 3, 1)
    assert counts.tolist() == [1, 1, 1]
    assert order.tolist() == [1, 0, 5, 2, 3, 4]  # kept: group 0, 1, 2; then dropped in order
    assert inverse.tolist() == [1, 0, 3, 4, 5, 2]


def test_pad_groups_hand_worked():
    # 6 slots (k = 1) in groups [1, 0, 1, 2, 1, 0] of 4 (group 3 empty)
    ids = torch.tensor([1, 0, 1, 2, 1, 0])
    order, inverse, counts = ops.sort_by_group_reference(ids, ids.new_empty(0), 4, -1)
    assert order.tolist() == [1, 5, 0, 2, 4, 3]
    padded_order, padded_inverse = ops.pad_groups(order, inverse, counts, 3)
    assert padded_order.tolist() == [1, 5, -1, 0, 2, 4, 3, -1, -1, -1, -1, -1]
    assert padded_inverse.tolist() == [3, 0, 4, 6, 5, 1]
    # capacity 2 drops slot 4 (group 1's third); it stays past every padded row
    order, inverse, counts = ops.sort_by_group_reference(ids, ids.new_empty(0), 4, 2)
    padded_order, padded_inverse = ops.pad_groups(order, inverse, counts, 2)
    assert padded_order.tolist() == [1, 5, 0, 2, 3, -1, -1, -1]
    assert padded_inverse.tolist() == [2, 0, 3, 4, 8, 1]
    with pytest.raises(ValueError, match="largest group"):
        ops.pad_groups(order, inverse, counts, 1)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 15, 16, 33, 1024])
@pytest.mark.parametrize("k", [1, 2])
def test_unpermute_one_pass_widths_equal_reference(dtype, D, k):
    # top-1 / top-2 tokens with every slot kept take the one-pass combine; with a capacity some
    # tokens lose a slot and take the row-by-row sum: widths cover the vector body and its tail
    N, G = 40, 4
    for capacity in (None, 6):
        ids, priority, _ = case(N, k, G, capacity, False, seed=D)
        order, inverse, counts = ops.sort_by_group(ids, G, priority, capacity)
        kept = int(counts.sum())
        y = torch.randn(kept, D).to(dtype)
        w = torch.rand(N * k)
        for weights in (None, w):
            got = torch.ops.moe_ops.unpermute_rows(y, order, inverse, weights, k, kept)
            want = ops.unpermute_rows_reference(y, order, inverse, weights, k, kept)
            if dtype == torch.float32:  # a fused multiply-add may round once where it rounds twice
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, k, G, capacity, empty_group", [c for c in CASES if c[0] in (0, 9)])
def test_rows_ops_equal_reference(dtype, N, k, G, capacity, empty_group):
    ids, priority, _ = case(N, k, G, capacity, empty_group, seed=1)
    order, inverse, counts = ops.sort_by_group(ids, G, priority, capacity)
    kept = int(counts.sum())
    D = 7
    x = torch.randn(N, D).to(dtype)
    y = torch.randn(kept, D).to(dtype)
    w = torch.rand(N * k)
    tol = dict(atol=0, rtol=0) if dtype in (torch.float32, torch.float64) \
        else dict(atol=1e-2, rtol=1e-2)
    # k > 1 sums k rows: the kernel may fuse multiply-adds, which rounds once where the
    # reference rounds twice
    sum_tol = {key: max(value, 1e-6) for key, value in tol.items()}
    for weights in (None, w):
        torch.testing.assert_close(torch.ops.moe_ops.permute_rows(x, order, inverse, weights, k,
                                                                  kept),
                                   ops.permute_rows_reference(x, order, inverse, weights, k, kept),
                                   **tol)
        torch.testing.assert_close(
            torch.ops.moe_ops.unpermute_rows(y, order, inverse, weights, k, kept),
            ops.unpermute_rows_reference(y, order, inverse, weights, k, kept),
            **(tol if k == 1 else sum_tol))
    torch.testing.assert_close(torch.ops.moe_ops.slot_dots(x, y, order, inverse, k, kept),
                               ops.slot_dots_reference(x, y, order, inverse, k, kept),
                               atol=1e-4 if dtype != torch.float64 else 1e-12, rtol=1e-3)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("N, k, G, capacity, empty_group",
                         [c for c in CASES if c[0] in (0, 9) and c[1] < 4 and c[2] == 3])
def test_fused_unpermute_backward_equals_its_two_passes(dtype, padded, N, k, G, capacity,
                                                       empty_group):
    ids, priority, _ = case(N, k, G, capacity, empty_group, seed=4)
    order, inverse, counts = ops.sort_by_group(ids, G, priority, capacity)
    kept = int(counts.sum())
    if padded:
        rows = int(counts.max()) + 2
        order, inverse = ops.pad_groups(order, inverse, counts, rows)
        kept = G * rows
    D = 9
    grad, y, w = torch.randn(N, D).to(dtype), torch.randn(kept, D).to(dtype), torch.rand(N * k)
    grad_y, grad_w = torch.ops.moe_ops.unpermute_rows_backward(grad, y, order, inverse, w, k,
                                                              kept)
    want_y = ops.permute_rows_reference(grad, order, inverse, w, k, kept)[:kept]
    assert torch.equal(grad_y, want_y)  # the same rounding: one multiply per element
    want_w = ops.slot_dots_reference(grad, y, order, inverse, k, kept)
    torch.testing.assert_close(grad_w, want_w, atol=1e-4 if dtype != torch.float64 else 1e-12,
                               rtol=1e-3)
    assert grad_w[inverse >= kept].eq(0).all()  # dropped slots: no gradient


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, k, G, capacity, empty_group",
                         [c for c in CASES if c[0] in (1, 9) and c[1] < 4])
def test_rows_ops_on_padded_layout_equal_reference(dtype, N, k, G, capacity, empty_group):
    ids, priority, _ = case(N, k, G, capacity, empty_group, seed=2)
    order, inverse, counts = ops.sort_by_group(ids, G, priority, capacity)
    rows = int(counts.max()) + 1
    order, inverse = ops.pad_groups(order, inverse, counts, rows)
    kept, D = G * rows, 5
    x, y, w = torch.randn(N, D).to(dtype), torch.randn(kept, D).to(dtype), torch.rand(N * k)
    permuted = torch.ops.moe_ops.permute_rows(x, order, inverse, w, k, kept)
    torch.testing.assert_close(permuted, ops.permute_rows_reference(x, order, inverse, w, k,
                                                                    kept), atol=0, rtol=0)
    assert not permuted[order < 0].any()  # padding rows are zeros
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(torch.ops.moe_ops.unpermute_rows(y, order, inverse, w, k, kept),
                               ops.unpermute_rows_reference(y, order, inverse, w, k, kept), **tol)
    torch.testing.assert_close(torch.ops.moe_ops.slot_dots(x, y, order, inverse, k, kept),
                               ops.slot_dots_reference(x, y, order, inverse, k, kept),
                               atol=1e-4, rtol=1e-3)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 31, 33, 100, 1024])
def test_vectorised_rows_equal_reference(dtype, D):
    """Row lengths around and across the vector widths; bfloat16 rounding is bit-exact."""
    ids, priority, _ = case(40, 2, 5, None, False, seed=2)
    order, inverse, counts = ops.sort_by_group(ids, 5, priority)
    S = order.numel()
    x = (torch.randn(40, D) * 3).to(dtype)
    y = (torch.randn(S, D) * 3).to(dtype)
    w = torch.rand(S)
    assert torch.equal(torch.ops.moe_ops.permute_rows(x, order, inverse, w, 2, S),
                       ops.permute_rows_reference(x, order, inverse, w, 2, S))
    torch.testing.assert_close(torch.ops.moe_ops.unpermute_rows(y, order, inverse, w, 2, S),
                               ops.unpermute_rows_reference(y, order, inverse, w, 2, S),
                               atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 8e-3)
    torch.testing.assert_close(torch.ops.moe_ops.slot_dots(x, y, order, inverse, 2, S),
                               ops.slot_dots_reference(x, y, order, inverse, 2, S),
                               atol=1e-3 * D ** 0.5, rtol=1e-4)


@needs_kernels
def test_bfloat16_rounding_of_special_values_matches_torch():
    """Ties to even, overflow to infinity, NaN and infinities kept, through the scaled copy."""
    vals = torch.tensor([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 3.0e38, float("inf"),
                         float("-inf"), float("nan"), 0.0, -0.0, 1e-40] * 4)
    x = vals.to(torch.bfloat16).view(1, -1)
    order = torch.zeros(1, dtype=torch.long)
    for scale in (1.0, 1.0 + 2 ** -8, 2.0, 0.3):
        w = torch.tensor([scale])
        got = torch.ops.moe_ops.permute_rows(x, order, order, w, 1, 1)
        want = ops.permute_rows_reference(x, order, order, w, 1, 1)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)) or (
            torch.equal(got.isnan(), want.isnan())
            and torch.equal(got[~got.isnan()], want[~want.isnan()]))


def test_duplicate_groups_within_a_token():
    """A token may send two of its slots to the same group: both rows exist and both count."""
    ids = torch.tensor([2, 2, 0, 1])  # token 0 chooses group 2 twice
    order, inverse, counts = ops.sort_by_group(ids, 3)
    x = torch.tensor([[1.0], [10.0]])
    rows = ops.permute_rows(x, order, inverse, None, 2)
    assert rows.flatten().tolist() == [10.0, 10.0, 1.0, 1.0]
    out = ops.unpermute_rows(rows, order, inverse, torch.tensor([0.25, 0.5, 1.0, 2.0]), 2)
    assert out.flatten().tolist() == [0.75, 30.0]


@needs_kernels
@pytest.mark.parametrize("k, capacity", [(1, None), (2, None), (2, 2), (4, 3)])
def test_gradients_by_gradcheck(k, capacity):
    N, G, D = 6, 3, 4
    ids, priority, _ = case(N, k, G, capacity, False, seed=2)
    order, inverse, counts = ops.sort_by_group(ids, G, priority, capacity)
    kept = int(counts.sum())
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(kept, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(N * k, requires_grad=True)
    # weights are float32 by contract: check x and y in float64, w with a looser tolerance
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.moe_ops.permute_rows(x, order, inverse, w.detach(), k, kept), (x,))
    assert torch.autograd.gradcheck(
        lambda y: torch.ops.moe_ops.unpermute_rows(y, order, inverse, w.detach(), k, kept), (y,))
    out = torch.ops.moe_ops.unpermute_rows(y.detach(), order, inverse, w, k, kept)
    grad = torch.randn_like(out)
    (g_w,) = torch.autograd.grad(out, w, grad)
    ref = ops.unpermute_rows_reference(y.detach(), order, inverse, w, k, kept)
    (g_ref,) = torch.autograd.grad(ref, w, grad)
    torch.testing.assert_close(g_w, g_ref, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_opcheck_every_op():
    N, k, G, D = 8, 2, 4, 16
    ids, priority, _ = case(N, k, G, 3, False, seed=3)
    order, inverse, counts = ops.sort_by_group(ids, G, priority, 3)
    kept = int(counts.sum())
    x = torch.randn(N, D, requires_grad=True)
    y = torch.randn(kept, D, requires_grad=True)
    w = torch.rand(N * k, requires_grad=True)
    m = torch.ops.moe_ops
    torch.library.opcheck(m.sort_by_group, (ids, priority, G, 3))
    torch.library.opcheck(m.permute_rows, (x, order, inverse, w, k, kept))
    torch.library.opcheck(m.permute_rows, (x, order, inverse, None, k, kept))
    torch.library.opcheck(m.unpermute_rows, (y, order, inverse, w, k, kept))
    torch.library.opcheck(m.slot_dots, (x.detach(), y.detach(), order, inverse, k, kept))
    torch.library.opcheck(m.unpermute_rows_backward,
                          (x.detach(), y.detach(), order, inverse, w.detach(), k, kept))


@needs_kernels
def test_torch_compile_traces_the_ops_without_graph_breaks():
    N, k, G, D = 16, 2, 4, 8
    ids = torch.randint(0, G, (N * k,))
    order, inverse, _ = ops.sort_by_group(ids, G)

    def moe_like(x, w):  # dropless: kept = N * k is static
        rows = torch.ops.moe_ops.permute_rows(x, order, inverse, None, k, N * k)
        return torch.ops.moe_ops.unpermute_rows(torch.tanh(rows), order, inverse, w, k, N * k)

    compiled = torch.compile(moe_like, fullgraph=True, backend="aot_eager")
    x = torch.randn(N, D, requires_grad=True)
    w = torch.rand(N * k, requires_grad=True)
    out = compiled(x, w)
    out.sum().backward()
    torch.testing.assert_close(out, moe_like(x, w))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile(source, tmp_path):
    """`nvcc -c` every .cu file, so a CUDA error fails CI on machines without a GPU. The CPU
    build of torch ships c10/cuda headers but not its generated config header: a stub stands in
    for that one file."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["nvcc", "-c", "-std=c++20", "-arch=sm_90", f"-I{tmp_path / 'stub'}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
           str(source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_reference_notice_when_kernels_are_missing():
    """Without the extension the package still imports, says so in one line, and runs."""
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name == 'moe._C' or (a and a[2] and '_C' in a[2] and name == 'moe'):\n"
            "        raise ImportError('hidden')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "import torch\n"
            "from moe import ops\n"
            "assert not ops.AVAILABLE\n"
            "order, inverse, counts = ops.sort_by_group(torch.tensor([1, 0, 1]), 2)\n"
            "print(order.tolist())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 0, 2]"
    notice = [line for line in result.stderr.splitlines() if "compiled kernels not built" in line]
    assert len(notice) == 1
