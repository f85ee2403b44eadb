"""The CPU allocator setting: freed large tensors stay in the heap for reuse."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import sys, torch
from experiments.allocator import keep_freed_memory
state = keep_freed_memory()
x = torch.empty(64 * 2 ** 20, dtype=torch.uint8)  # above glibc's default mmap threshold
ptr = x.data_ptr()
heap = [l.split()[0] for l in open('/proc/self/maps') if l.rstrip().endswith('[heap]')]
lo, hi = (int(v, 16) for v in heap[0].split('-'))
print(state, lo <= ptr < hi)
"""


def probe(choice: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOT_CPU_ALLOCATOR=choice)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def glibc_linux() -> bool:
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return False
    return os.path.exists("/proc/self/maps") and libc.startswith("glibc")


@pytest.mark.skipif(not glibc_linux(), reason="needs glibc and /proc (Linux)")
def test_tuned_allocator_serves_large_tensors_from_the_heap():
    tuned, default = probe("tuned"), probe("default")
    assert tuned.returncode == 0, tuned.stderr
    assert default.returncode == 0, default.stderr
    assert tuned.stdout.split() == ["tuned", "True"]
    assert default.stdout.split() == ["default", "False"]  # glibc maps it and unmaps it on free


def test_bad_allocator_choice_is_rejected():
    r = probe("jemalloc")
    assert r.returncode != 0
    assert "MOT_CPU_ALLOCATOR must be 'tuned' or 'default'" in r.stderr
