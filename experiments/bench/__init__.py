"""Benchmarks: `python -m experiments.bench NAME` prints a table, then one JSON line of ratios.

Variants are timed alternately in one process after warm-up, in forward order in even rounds
and in reverse order in odd ones (a, b, b, a, ...: no variant always runs after the same one,
and a steady drift of the machine's speed cancels out of each pair of rounds). Times are reported
as medians, and ratios as the median over rounds of the ratio within a round (paired: two
variants timed back to back see the same machine load), so that ratios carry the result on
noisy machines.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# Untimed calls before timing, by default. In half precision on CPU, oneDNN compiles a kernel
# for every new product shape (2-15 ms each); grouped products run whole 64-row blocks
# (moe/cpu_gemm.py), so group sizes that change every call still meet new row counts, fewer
# and fewer, over about the first 50 calls, as over a training run's first 50 steps (one MoT
# block in bfloat16: 38 ms of compiling per call over calls 8-23, 10 over 24-39, 6 over 40-55,
# almost none after).
# Timing after 8 calls would measure that one-time transient; after 48, the steady state.
WARMUP = {torch.float32: 8, torch.float64: 8, torch.bfloat16: 48, torch.float16: 48}


def warmup_calls(requested: int | None, dtype: torch.dtype) -> int:
    """`requested`, or the default number of untimed calls for `dtype` (see WARMUP)."""
    return WARMUP.get(dtype, 8) if requested is None else requested


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order of the calls in a round: `names` in even rounds, reversed in odd ones."""
    return names if round_index % 2 == 0 else names[::-1]


def time_rounds(fns: dict[str, Callable[[], None]], repeats: int = 7,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each function in each round, calling them in turn, the order reversed every
    other round (a, b, c, c, b, a, a, b, c, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in round_order(list(fns), r):
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def time_alternating(fns: dict[str, Callable[[], None]], repeats: int = 7,
                     warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed alternately."""
    return {name: statistics.median(ts) for name, ts in time_rounds(fns, repeats, warmup).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of times[a] / times[b]."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))
