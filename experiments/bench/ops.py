"""Permute + weighted unpermute, forward + backward: compiled kernels vs PyTorch references,
both against the memory-copy floor.

    python -m experiments.bench ops [--tokens 16384 --dim 1024 --k 2 --groups 8]

The floor is the bytes the four passes must move (permute: read and write S rows; unpermute:
read S rows, write N; permute's backward the same as unpermute; unpermute's backward, rows and
weights' gradients in one pass: read S token rows and S expert rows, write S rows) divided by the
bandwidth of a large `copy_` of written memory measured in the same run: the fastest of four
copies whose source and destination sit 0, 1, 2 and 3 KB further apart modulo 4 KB. A `copy_`
here runs up to 1.4x slower when its destination starts less than about 512 bytes past its
source modulo 4 KB (loads stalled behind earlier stores to the same page offset: 4K aliasing),
which two fresh tensors do or do not by chance; one copy alone moved the floor, and so the share
of copy bandwidth, by that much from run to run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from experiments.bench import paired_ratio, time_rounds
from moe import ops

COPY_OFFSETS = (0, 1024, 2048, 3072)  # bytes between the copies' destinations, within 4 KB


def copy_variants(mib: int = 64) -> dict[str, Callable[[], None]]:
    """`copy_` of `mib` MiB of float32 into destinations COPY_OFFSETS bytes apart, one function
    each (time them all; the fastest is the machine's copy bandwidth)."""
    n = mib * 2 ** 20 // 4
    # written first: pages never written read as the kernel's shared zero page, which a copy
    # reads from cache, faster than any real rows
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.zeros(n + COPY_OFFSETS[-1] // 4, dtype=torch.float32)
    return {f"copy+{off}": (lambda o=off // 4: dst[o:o + n].copy_(src)) for off in COPY_OFFSETS}


def copy_bandwidth(times: dict[str, list[float]], mib: int = 64) -> float:
    """Bytes read and written per second by the fastest copy of `copy_variants` (median times)."""
    fastest = min(statistics.median(ts) for name, ts in times.items() if name.startswith("copy+"))
    return 2 * mib * 2 ** 20 / fastest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench ops")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    if not ops.AVAILABLE:
        print("moe._C is not built: nothing to compare (reinstall with a C++ compiler)")
        return 1
    N, D, k, G = args.tokens, args.dim, args.k, args.groups
    S = N * k
    ids = torch.randint(0, G, (N, k)).reshape(-1)
    order, inverse, counts = ops.sort_by_group(ids, G)
    print(f"permute + weighted unpermute, fwd+bwd, N={N} D={D} k={k} groups={G}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'dtype':<10}{'kernel ms':>11}{'reference ms':>14}{'floor ms':>10}"
          f"{'speedup':>9}{'of copy bw':>12}")
    result = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        x = torch.randn(N, D, dtype=dtype, requires_grad=True)
        w = torch.rand(S, requires_grad=True)
        grad = torch.randn(N, D, dtype=dtype)

        def run(permute, unpermute):
            def step():
                x.grad = w.grad = None
                rows = permute(x, order, inverse, None, k, S)
                unpermute(rows, order, inverse, w, k, S).backward(grad)
            return step

        fns = {
            "kernel": run(torch.ops.moe_ops.permute_rows, torch.ops.moe_ops.unpermute_rows),
            "reference": run(ops.permute_rows_reference, ops.unpermute_rows_reference),
        } | copy_variants()
        rounds = time_rounds(fns, repeats=args.repeats)
        t = {n: statistics.median(v) for n, v in rounds.items()}
        bandwidth = copy_bandwidth(rounds)
        rows_moved = 2 * S + (S + N) + 3 * S + (S + N)
        floor = rows_moved * D * x.element_size() / bandwidth
        r = {"speedup_vs_reference": round(paired_ratio(rounds, "reference", "kernel"), 2),
             "fraction_of_copy_bandwidth": round(floor / t["kernel"], 2)}
        result[name] = r
        print(f"{name:<10}{t['kernel'] * 1e3:>11.1f}{t['reference'] * 1e3:>14.1f}"
              f"{floor * 1e3:>10.1f}{r['speedup_vs_reference']:>9.2f}"
              f"{r['fraction_of_copy_bandwidth']:>12.2f}")
    print(json.dumps(result))
    return 0
