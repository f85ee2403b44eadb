"""The grouping primitive under both MoT and MoE.

Tokens carry an integer group id (a modality for MoT, an expert for MoE). `Grouping.from_ids`
sorts them once into contiguous groups (a stable permutation, per-group counts and offsets);
`grouped_linear` applies one weight per group to the sorted rows; `Grouping.unpermute` puts rows
back in sequence order. MoT computes one grouping per forward and every layer reuses it.

    g = Grouping.from_ids(modality, num_groups=3)      # ids (B, T) -> N = B*T rows
    x_sorted = g.permute(x.reshape(-1, D))             # (N, D), rows grouped by id
    y_sorted = grouped_linear(x_sorted, w_GIO, g.offsets)  # w_GIO (G, D_in, D_out)
    y = g.unpermute(y_sorted)                          # (N, D_out), sequence order
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Grouping:
    """ids (N,), order (N,): sorted row -> original row; position (N,): original row -> sorted
    row; counts (G,) int64; offsets (G,) int32, the end of each group in sorted order."""

    ids: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, ...]  # the leading shape of the ids, e.g. (B, T)

    @staticmethod
    def from_ids(ids: torch.Tensor, num_groups: int) -> Grouping:
        if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
            raise ValueError(f"group ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_groups):
            raise ValueError(f"group ids must be in [0, {num_groups}), got range "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        order = torch.argsort(flat, stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(flat.numel(), device=flat.device)
        counts = torch.bincount(flat, minlength=num_groups)
        return Grouping(flat, order, position, counts, counts.cumsum(0).to(torch.int32),
                        tuple(ids.shape))

    @property
    def num_groups(self) -> int:
        return self.counts.numel()

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) rows in sequence order -> rows grouped by id."""
        return _Permute.apply(x, self.order, self.position)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """(N, D) rows grouped by id -> sequence order."""
        return _Permute.apply(y, self.position, self.order)


def as_grouping(groups, num_groups: int, leading_shape: tuple[int, ...]) -> Grouping:
    """Accept either precomputed `Grouping` or raw ids (the block contract allows both)."""
    if groups is None:
        raise ValueError("this block routes by group id: pass modality ids, shape "
                         f"{leading_shape}")
    if not isinstance(groups, Grouping):
        if tuple(groups.shape) != tuple(leading_shape):
            raise ValueError(f"modality ids of shape {tuple(groups.shape)} must match the "
                             f"input's leading shape {tuple(leading_shape)}")
        groups = Grouping.from_ids(groups, num_groups)
    elif groups.shape != tuple(leading_shape):
        raise ValueError(f"grouping of shape {groups.shape} does not match the input's "
                         f"leading shape {tuple(leading_shape)}")
    if groups.num_groups != num_groups:
        raise ValueError(f"grouping has {groups.num_groups} groups, the block {num_groups}")
    return groups


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
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    outs = [x[s:e] @ weight[g] for g, (s, e) in enumerate(zip(starts, ends))]
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


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (N, D_in) rows grouped by id, weight (G, D_in, D_out), offsets (G,) int32 group ends
    -> (N, D_out). One grouped GEMM where it applies, else the per-group loop."""
    if _grouped_mm_applies(x, weight):
        y = F.grouped_mm(x.contiguous(), weight, offs=offsets)
        return _ContiguousGrad.apply(y) if y.requires_grad else y
    return grouped_linear_reference(x, weight, offsets)


def _register_grouped_mm_flops() -> None:
    """Teach `torch.utils.flop_counter` the cost of grouped_mm (2 x the multiply-adds of its
    groups), so FlopCounterMode counts MoT/MoE layers like dense ones."""
    from torch.utils import flop_counter

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
