"""Keep freed memory in the process, so that the large arrays of one step are reused by
the next instead of being faulted in again from the operating system.

A training step allocates the same large temporaries every time and frees them before
the next step: for the convolutional models, four window matrices of 12.8 MB each
(im2col, batch 128). glibc's malloc serves an allocation above its mmap threshold
(128 KiB at first) with a fresh mapping from the kernel and unmaps it on free, and it
returns the free top of its heap to the kernel above a trim threshold. Each step then
writes into pages the kernel has never handed to the process, and every 4 KiB page costs
a page fault and a zeroing on first touch: a quarter of a convolutional VAE's step on a
2-core KVM guest (99 ms against 75 ms, benchmarks/RESULTS.md).

:func:`keep_freed_memory` raises both thresholds, so freed blocks stay in the heap and
the next step reuses pages that are already mapped. Arrays above 32 MiB, glibc's upper
limit for the mmap threshold, still come from and return to the kernel. The command line
calls it once, before any work; the library never does it on its own, because it is a
setting of the whole process. On other C libraries (macOS, Windows, musl) it does
nothing and says so.
"""
from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 * 1024 * 1024  # free heap top kept before it is given back
TOP_PAD = 16 * 1024 * 1024  # extra heap asked for at each growth


def _glibc_mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # present in glibc only (musl has a mallopt that does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it was done.

    Safe to call more than once. Fixing the mmap threshold also stops glibc from moving
    it with each free, so the behaviour is the same from the first step to the last.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    done = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            mallopt(M_TOP_PAD, TOP_PAD)]
    return all(r == 1 for r in done)  # mallopt returns 1 on success
