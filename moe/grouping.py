"""The grouping primitive under both MoT and MoE.

Tokens carry an integer group id (a modality for MoT, an expert for MoE). `Grouping.from_ids`
sorts them once into contiguous groups (a stable permutation, per-group counts and offsets);
`grouped_linear` applies one weight per group to the sorted rows; `Grouping.unpermute` puts rows
back in sequence order. MoT computes one grouping per forward and every layer reuses it.

    g = Grouping.from_ids(modality, num_groups=3)      # ids (B, T) -> N = B*T rows
    x_sorted = g.permute(x.reshape(-1, D))             # (N, D), rows grouped by id
    y_sorted = grouped_linear(x_sorted, w_GIO, g.offsets)  # w_GIO (G, D_in, D_out)
    y = g.unpermute(y_sorted)                          # (N, D_out), sequence order

Layout. A grouping says in which order the activations handed along with it are: `grouped=False`
means sequence order, shaped (*shape, D); `grouped=True` means rows already sorted by id, shaped
(N, D). Token-wise layers work in either; grouped layers skip both gathers when the rows are
already grouped, which is how the MoT backbone keeps its residual stream (see `mot.model`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moe import cpu_gemm


@dataclass
class Grouping:
    """ids (N,) in sequence order; sorted_ids (N,) = ids[order]; order (N,): sorted row ->
    original row; position (N,): original row -> sorted row; counts (G,) int64; offsets (G,)
    int32, the end of each group in sorted order; spans: the same bounds as Python
    (start, end) pairs, read from the device once; shape: the leading shape of the ids, e.g.
    (B, T); grouped: whether the activations travelling with it are in sorted order."""

    ids: torch.Tensor
    sorted_ids: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    spans: list[tuple[int, int]]
    shape: tuple[int, ...]
    grouped: bool = False

    @staticmethod
    def from_ids(ids: torch.Tensor, num_groups: int, grouped: bool = False) -> Grouping:
        from moe.ops import sort_by_group  # the compiled counting sort where built

        flat = check_ids(ids, num_groups).reshape(-1).long()
        order, position, counts = sort_by_group(flat, num_groups)
        offsets = counts.cumsum(0)
        return Grouping(flat, flat[order], order, position, counts, offsets.to(torch.int32),
                        cpu_gemm.spans_of(offsets), tuple(ids.shape), grouped)

    @property
    def num_groups(self) -> int:
        return self.counts.numel()

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """The leading shape of the activations in this layout: (N,) or `shape`."""
        return (self.ids.numel(),) if self.grouped else self.shape

    def row_ids(self) -> torch.Tensor:
        """The group id of each activation row, in this layout, shaped `rows_shape`."""
        return self.sorted_ids if self.grouped else self.ids.view(self.shape)

    def in_sequence_order(self) -> Grouping:
        return replace(self, grouped=False) if self.grouped else self

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """Activations of this layout -> sequence order (*shape, ...)."""
        if not self.grouped:
            return y
        return self.unpermute(y).view(*self.shape, *y.shape[1:])

    def from_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Activations in sequence order (*shape, ...) -> this layout."""
        if not self.grouped:
            return x
        return self.permute(x.reshape(self.ids.numel(), *x.shape[len(self.shape):]))

    def run_grouped(self, x: torch.Tensor, fn) -> torch.Tensor:
        """Apply `fn` to the rows of x (..., D) sorted by group, return them in x's layout.
        fn: (N, D) grouped rows -> (N, D_out)."""
        rows = x.reshape(-1, x.shape[-1])
        if not self.grouped:
            rows = self.permute(rows)
        y = fn(rows)
        if not self.grouped:
            y = self.unpermute(y)
        return y.view(*x.shape[:-1], y.shape[-1])

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) rows in sequence order -> rows grouped by id."""
        return gather_rows(x, self.order, self.position)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """(N, D) rows grouped by id -> sequence order."""
        return gather_rows(y, self.position, self.order)


def check_ids(ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """ValueError unless `ids` is an integer tensor with values in [0, num_groups)."""
    if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"group ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_groups):
        raise ValueError(f"group ids must be in [0, {num_groups}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def _check_routing(groups, num_groups: int, x: torch.Tensor) -> tuple[int, ...]:
    if groups is None:
        raise ValueError("this block routes by group id: pass modality ids shaped like the "
                         f"input's leading dims (input {tuple(x.shape)})")
    lead = groups.rows_shape if isinstance(groups, Grouping) else tuple(groups.shape)
    if tuple(x.shape[:len(lead)]) != tuple(lead) or x.dim() <= len(lead):
        what = "grouping rows" if isinstance(groups, Grouping) else "modality ids"
        raise ValueError(f"{what} of shape {tuple(lead)} must match the leading dims of the "
                         f"input {tuple(x.shape)}")
    if isinstance(groups, Grouping) and groups.num_groups != num_groups:
        raise ValueError(f"grouping has {groups.num_groups} groups, the block {num_groups}")
    return lead


def as_grouping(groups, num_groups: int, x: torch.Tensor) -> Grouping:
    """The grouping of input x: a precomputed `Grouping`, or one built from raw ids (the block
    contract allows both)."""
    _check_routing(groups, num_groups, x)
    return groups if isinstance(groups, Grouping) else Grouping.from_ids(groups, num_groups)


def row_ids(groups, num_groups: int, x: torch.Tensor) -> torch.Tensor:
    """The group id of each leading position of x, without sorting anything."""
    _check_routing(groups, num_groups, x)
    return groups.row_ids() if isinstance(groups, Grouping) else check_ids(groups, num_groups)


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[index] for a permutation `index` of x's rows, `inverse` its inverse; x (N, ...). The
    compiled permute (k = 1, no weights; autograd in C++) for contiguous floating-point rows,
    else `_Permute`."""
    from moe import ops

    if x.dim() > 1 and x.numel() and x.is_contiguous() and x.is_floating_point() \
            and ops._compiled(x):
        rows = x.view(x.shape[0], -1)
        return ops.permute_rows(rows, index, inverse, None, 1).view(x.shape)
    return _Permute.apply(x, index, inverse)


class _Permute(torch.autograd.Function):
    """y = x[index]; since index is a permutation, the gradient is a gather by its inverse
    (cheaper than the scatter-add autograd would use for a general index)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                             offsets: torch.Tensor) -> torch.Tensor:
    """The readable definition: rows [offsets[g-1], offsets[g]) times weight[g].
    x (N, D_in) grouped rows, weight (G, D_in, D_out), offsets (G,) group ends -> (N, D_out)."""
    outs = [x[s:e] @ weight[g] for g, (s, e) in enumerate(cpu_gemm.spans_of(offsets))]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[-1])


def _grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """grouped_mm needs: the op (torch >= 2.9), float32/bf16/fp16 on CPU or bf16 on CUDA,
    rows whose strides are multiples of 16 bytes, and at least one row."""
    if not hasattr(F, "grouped_mm") or x.shape[0] == 0:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    else:
        return False
    item = x.element_size()
    return (ok_dtype and x.dtype == weight.dtype and (x.shape[1] * item) % 16 == 0
            and (weight.shape[2] * item) % 16 == 0)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects stride-0 gradients such as the one of `y.sum()`."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   contiguous_grad: bool = False) -> torch.Tensor:
    """x (N, D_in) rows grouped by id, weight (G, D_in, D_out), offsets (G,) int32 group ends
    -> (N, D_out). One grouped GEMM where it applies, else the per-group loop; half precision
    on CPU cuts the groups into few distinct shapes (`moe.cpu_gemm`). `contiguous_grad=True`
    promises that the output's gradient will be a contiguous tensor (the caller's next op
    makes one), which skips the guard for grouped_mm's backward (an autograd node per call)."""
    if cpu_gemm.applies(x, weight):
        return cpu_gemm.split_grouped_linear(x, weight, offsets)
    if _grouped_mm_applies(x, weight):
        y = F.grouped_mm(x.contiguous(), weight, offs=offsets)
        return _ContiguousGrad.apply(y) if y.requires_grad and not contiguous_grad else y
    return grouped_linear_reference(x, weight, offsets)


def _register_grouped_mm_flops() -> None:
    """Teach `torch.utils.flop_counter` the cost of grouped_mm and of our CPU grouped kernels
    (2 x the multiply-adds of their groups), so FlopCounterMode counts MoT/MoE layers like
    dense ones."""
    from torch.utils import flop_counter

    # the CPU kernels of moe.cpu_gemm count the groups' rows only
    if cpu_gemm._compiled and torch.ops.moe_ops.group_rows_mm not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(torch.ops.moe_ops.group_rows_mm)
        def _rows_flops(a_shape, b_shape, ends, *args, **kwargs) -> int:
            return 2 * (ends[-1] if ends else 0) * a_shape[1] * b_shape[2]

        @flop_counter.register_flop_formula(torch.ops.moe_ops.group_inner_mm)
        def _inner_flops(a_shape, b_shape, ends, *args, **kwargs) -> int:
            return 2 * (ends[-1] if ends else 0) * a_shape[1] * b_shape[1]

        # the fused SwiGLU FFN: its products on the groups' rows, as the separate kernels count
        @flop_counter.register_flop_formula(torch.ops.moe_ops.grouped_swiglu_forward)
        def _ffn_flops(x_shape, w13_shape, w2_shape, ends, *args, **kwargs) -> int:
            D, H2, Do = x_shape[1], w13_shape[2], w2_shape[2]
            return 2 * (ends[-1] if ends else 0) * (D * H2 + H2 // 2 * Do)

        @flop_counter.register_flop_formula(torch.ops.moe_ops.grouped_swiglu_backward)
        def _ffn_backward_flops(grad_shape, x_shape, w13_shape, w2_shape, gate_up_shape, ends,
                                needs, *args, **kwargs) -> int:
            D, H2, Do = x_shape[1], w13_shape[2], w2_shape[2]
            need_x, need_w13, need_w2 = (bool(n) for n in needs)
            products = (need_x or need_w13) * H2 // 2 * Do + need_w2 * H2 // 2 * Do \
                + (need_x + need_w13) * H2 * D
            return 2 * (ends[-1] if ends else 0) * products

        # the routed FFN (gather and combine in the same kernels): the same products
        @flop_counter.register_flop_formula(torch.ops.moe_ops.routed_swiglu_forward)
        def _routed_flops(x_shape, w13_shape, w2_shape, order_shape, inverse_shape,
                          weights_shape, ends, k, *args, **kwargs) -> int:
            return _ffn_flops(x_shape, w13_shape, w2_shape, ends)

        @flop_counter.register_flop_formula(torch.ops.moe_ops.routed_swiglu_backward)
        def _routed_backward_flops(grad_shape, x_shape, w13_shape, w2_shape, gate_up_shape,
                                   order_shape, inverse_shape, weights_shape, ends, k, needs,
                                   *args, **kwargs) -> int:
            need_x, _, need_w13, need_w2 = needs  # the weights' gradient: no product
            return _ffn_backward_flops(grad_shape, x_shape, w13_shape, w2_shape, gate_up_shape,
                                       ends, [need_x, need_w13, need_w2])

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        if len(a_shape) == 2 and len(b_shape) == 3:  # (N, K) x (G, K, M): forward, input grad
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if len(a_shape) == 2 and len(b_shape) == 2:  # (K, N) x (N, M) jagged N: weight grad
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        if len(a_shape) == 3 and len(b_shape) == 3:  # batched (G, n, K) x (G, K, M)
            return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
        return 2 * a_shape[-1] * int(torch.Size(out_shape).numel())  # (G, n, K) x (K, M) jagged


_register_grouped_mm_flops()
