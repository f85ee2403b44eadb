"""Benchmarks: `python -m experiments.bench NAME` prints a table, then one JSON line of ratios.

Variants are timed alternately in one process after warm-up and reported as medians, so that
ratios (not absolute times) carry the result on noisy machines.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_alternating(fns: dict[str, Callable[[], None]], repeats: int = 7,
                     warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, calling them in turn (a, b, c, a, b, c, ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
