"""glibc's heap held steady for a training process on the CPU.

Every step frees and allocates again the same activations and gradients. By default glibc gives
freed memory back to the kernel past thresholds that move with the process's history (the mmap
threshold rises with the largest block freed, the trim threshold is twice it), and the kernel
zero-fills each page again on its next first touch. On the demo config that was 11.7k page
faults per step, and identical processes stepped up to 3% apart, by the order of their first
allocations. Fixed thresholds (blocks up to 32 MiB, glibc's largest mmap threshold, from the
heap; no trimming below 2 GiB free) let a step reuse the last one's pages: 2k faults per step,
10% faster on the demo, and identical processes within 0.7% of each other (RESULTS.md). Peak
RSS is unchanged: a step needs its pages at its peak either way.

A user's own malloc settings win: memory measurements export MALLOC_MMAP_THRESHOLD_=65536 and
MALLOC_TRIM_THRESHOLD_=0 so that RSS follows the live tensors (benchmarks/memory.py).
"""

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1  # an int: the largest mallopt takes
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def user_set_malloc() -> bool:
    """Whether the environment tunes glibc's malloc itself."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in tunables


def hold_heap() -> bool:
    """Fix glibc's mmap and trim thresholds for the rest of this process (see the module doc);
    returns whether they were set: not under another C library or where the user set their own."""
    if platform.libc_ver()[0] != "glibc" or user_set_malloc():
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
