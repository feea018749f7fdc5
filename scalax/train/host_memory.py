"""The host allocator: memory a step frees stays in the process for the next step (Linux, glibc).

Every call of a compiled step on CPU allocates its temporaries afresh and frees them at its end. glibc's malloc
gives large blocks back to the kernel when they are freed (blocks over its mmap threshold are unmapped, the
heap's top is trimmed), so each step touched new pages and paid a page fault for every 4 KiB of them: for the
quickstart's larger models (d64 x 2 layers, d128) on one core, a quarter of the step (benchmarks/host_memory.py).
Raising both thresholds keeps freed blocks for reuse, as tcmalloc (which MaxText preloads on TPU hosts) does. The
cost: the process's resident memory stays at its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BELOW = 2**30  # blocks under 1 GiB come from the heap and stay there when freed


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc to load, or one without mallopt
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Ask malloc to keep freed blocks under KEEP_BELOW for reuse; True when the C library took both settings
    (glibc), False where there is nothing to set (macOS, musl: their own allocators)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
