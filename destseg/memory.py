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
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def heap_kept(trim_threshold: int = 1 << 30):
    """Within the block, glibc serves every allocation from its heap (no mmap per tensor) and keeps up to
    ``trim_threshold`` bytes of freed memory for the next step; on leaving, its defaults come back and the
    free memory goes back to the system. By default, tensors above 32 MB (a batch of 16 of 32 channels at
    128x128) are mapped and unmapped on every allocation: on a 2-core CPU a cpu-schedule student step spent
    ~10% of its time in the page faults (docs/BENCHMARKS.md, "Allocator"). Yields whether it applied."""
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
