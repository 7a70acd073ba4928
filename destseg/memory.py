"""Training keeps its freed memory in the process (glibc), so that each step's large tensors do not come
from fresh pages the kernel maps and zero-fills again on every step."""

from __future__ import annotations

import contextlib
import ctypes
import sys

# glibc's mallopt parameters (malloc.h) and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def glibc():
    """The process's C library when it is glibc (Linux), else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


@contextlib.contextmanager
def heap_kept(trim_threshold: int = 1 << 30):
    """Within the block, glibc serves every allocation from its heap (no mmap per tensor) and keeps up to
    ``trim_threshold`` bytes of freed memory for the next step; on leaving, its defaults come back and the
    free memory goes back to the system (glibc's dynamic mmap threshold stays off after it: mallopt cannot
    switch it back on). By default, tensors above 32 MB (a batch of 16 of 32 channels at 128x128) are mapped
    and unmapped on every allocation: a bottle cpu-schedule run on 2 cores took 77.8 million page faults and
    158 s of system time, with the heap kept 0.6 million and 4 s, the same weights bit for bit
    (docs/BENCHMARKS.md, "The heap kept"). Yields whether it applied."""
    libc = glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
