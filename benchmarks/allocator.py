"""The C library's allocator, pinned for benchmarking (no torch import here, so a test can check it in a fresh
interpreter whose allocator nothing has touched yet).

Explained in: book/benchmarks.md
"""

from __future__ import annotations

#: mallopt's parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def pin_allocator() -> bool:
    """Stop glibc's malloc from handing memory back to the OS: no trimming of the heap's top (trim threshold
    2 GiB) and no mmap below 32 MiB (the largest threshold mallopt takes; setting it also ends glibc's dynamic
    adjustment of both). With the defaults, memory freed at the end of a step is often returned and the next
    step takes a page fault (a zeroed 4 KiB page from the kernel) for every page it touches again, and how much
    is returned depends on the order of earlier allocations, so the count varies between identical runs.
    True if pinned (glibc), False where this libc has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
