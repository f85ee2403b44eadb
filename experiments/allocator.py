"""Keep freed CPU memory for reuse, so that every step does not page-fault its tensors afresh.

glibc's malloc hands allocations above its mmap threshold (at most 32 MB by default) straight to
the OS and returns them on free; a training step that allocates the same activations every step
then zero-fills them page by page each time, which for memory-bound work costs more than the
work itself (a (16384, 2048) float32 multiply: 27 ms into fresh pages, 10 ms into reused ones).
`keep_freed_memory()` raises the mmap and trim thresholds, as jemalloc or tcmalloc would behave,
for this process only. The experiment entry points call it first; set `MOT_CPU_ALLOCATOR=default`
to keep glibc's defaults. Library users call it themselves if they want it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30   # only allocations above 1 GiB are mapped and unmapped
TRIM_THRESHOLD = 2 ** 31 - 1  # never give the heap top back
TOP_PAD = 256 << 20        # grow the heap in 256 MiB steps (untouched pages cost nothing)

_state: str | None = None


def keep_freed_memory() -> str:
    """Tune glibc malloc once per process; returns "tuned", "default" (opted out by
    `MOT_CPU_ALLOCATOR=default`) or "unavailable" (not glibc)."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get("MOT_CPU_ALLOCATOR", "tuned")
    if choice not in ("tuned", "default"):
        raise ValueError(f"MOT_CPU_ALLOCATOR must be 'tuned' or 'default', got {choice!r}")
    if choice == "default":
        _state = "default"
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _state = "unavailable"
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
          and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
          and mallopt(_M_TOP_PAD, TOP_PAD) == 1)
    _state = "tuned" if ok else "unavailable"
    return _state
