"""Process-wide settings that make CPU runs faster.

**Keeping freed memory (glibc).** PyTorch's CPU allocator takes every tensor from ``malloc``. By
default glibc serves blocks larger than a dynamic threshold (128 KB, rising to at most 32 MB) with a
fresh ``mmap`` and unmaps them again on ``free``, and it returns the top of the heap to the system
as soon as 128 KB are free. A training step creates and frees hundreds of activation-sized
tensors, so each of them arrives as fresh pages that the kernel must fault in and zero: a tenth of
a training step or more (BENCHMARKS.md, "The allocator decides a lot on this CPU").
:func:`keep_freed_memory` raises the mmap and trim thresholds so that freed blocks stay in the heap
and are reused: the faults drop to zero after the first step. The
cost: the process keeps its peak memory mapped (as CUDA's caching allocator does on the GPU).

The ``rmt`` command applies it at start-up; set ``RMT_KEEP_FREED_MEMORY=0`` to run without it.
Python users call it themselves, before the first large allocation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2 ** 31 - 1
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (see the module doc).

    Returns ``True`` if the setting is in force: on Linux with glibc, unless the environment variable
    ``RMT_KEEP_FREED_MEMORY`` is ``0``. Elsewhere it does nothing and returns ``False``.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("RMT_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _INT_MAX) == 1  # large blocks from the heap, not per-block mmap
    ok = ok and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1  # never shrink the heap on free
    ok = ok and mallopt(_M_TOP_PAD, 64 << 20) == 1  # grow it in 64 MB steps
    _applied = ok
    return ok
