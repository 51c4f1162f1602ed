"""glibc allocator settings (freed memory kept for reuse) that make CPU training several times cheaper.

Not MANN's memory (algorithms/mann.py) nor graph memory (algorithm.checkpoint_inner_steps)."""

import ctypes
import sys

# glibc mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (older glibc caps this at 32 MiB: then use that).
MMAP_THRESHOLDS = (1 << 30, 32 * 1024 * 1024)
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks for reuse instead of handing them back to the OS.

    By default glibc serves large blocks with mmap and trims the heap after big frees, so
    every tensor allocation of a training step page-faults afresh. On the 2-core CI CPU
    this made a ProtoNet Omniglot run spend more time in the kernel than in PyTorch
    (71 s wall, 68 s system time; 32 s and under 1 s with this). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_set = any(libc.mallopt(M_MMAP_THRESHOLD, value) for value in MMAP_THRESHOLDS)
    return mmap_set and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_free_memory() -> bool:
    """Hand the free pages inside glibc's heaps back to the OS (malloc_trim(0)). Blocks kept
    among freed ones (a server's cached tasks among each request's activations) otherwise hold
    the heap's pages: the resident size grows far faster than what is kept. No-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False
