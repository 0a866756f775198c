"""Giving freed memory back to the operating system after a policy load.

A load builds many short-lived objects (file bytes, parsed YAML, CEL parse trees) next to the
compiled set that stays. Once they are freed, glibc's malloc keeps most of that memory in its
heaps for reuse instead of returning it, so the server's RSS stays at the load's peak: at
10,000 user policies, several MB more than what is live. `malloc_trim(0)` (glibc, see
malloc_trim(3)) returns the free pages at the top and in the middle of every heap to the
kernel. Memory held by Python's own small-object allocator (pymalloc arenas) is not affected:
CPython unmaps an arena itself once it is empty.

Only glibc has `malloc_trim`; elsewhere (musl, macOS) `release_free_memory()` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `int malloc_trim(size_t pad)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # no libc by that name, or not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def can_release() -> bool:
    """Whether this platform's C library has `malloc_trim` (glibc)."""
    return _malloc_trim() is not None


def release_free_memory() -> bool:
    """Return malloc's free memory to the OS (glibc `malloc_trim(0)`); never raises.

    Returns True when some memory was released, False when none was or the platform has no
    `malloc_trim`. Costs a few milliseconds on a heap of ~150 MB; ctypes drops the GIL for
    the call, so request threads keep running (allocations wait briefly for malloc's lock).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    try:
        return bool(trim(0))
    except Exception:  # never let freeing memory fail a reload
        log.debug("malloc_trim failed", exc_info=True)
        return False
