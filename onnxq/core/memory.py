"""Give freed memory back to the operating system between the pipeline's stages.

glibc keeps freed heap memory in its arenas; torch's per-window tensors (a few MB each) are served
from there once the allocator's dynamic mmap threshold has grown past them. After a stage that
made many of them (learning, the sensitivity pass) the process stays ~1 GB above what is live,
and the next stage's peak adds to it: on SmolLM2 ``--learn`` that was 1.1 GB of the 4.3 GB peak.
``malloc_trim`` returns those pages, and :func:`fixed_mmap_threshold` stops the threshold from
growing, so that large blocks keep their own mappings and go back to the OS when freed. Elsewhere
(Windows, macOS, musl) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import cache

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns the dynamic threshold off
MMAP_THRESHOLD = 4 << 20  # blocks from here up are mapped and unmapped on their own


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only


def fixed_mmap_threshold() -> bool:
    """Keep blocks of :data:`MMAP_THRESHOLD` and more out of the heap for the rest of the process.

    glibc raises its threshold to the size of each mapped block that is freed, so after the first
    large tensors every later one of that size comes from the heap, where fragments of it stay
    resident long after it is freed and stack up stage over stage. Where that was possible: True.
    """
    libc = _libc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def trim() -> bool:
    """Hand free heap pages back to the OS (a few ms); True where that was possible."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release() -> bool:
    """Collect garbage cycles, then :func:`trim`: between stages, where a stage's objects just died."""
    gc.collect()
    return trim()


def slices(length: int, item_bytes: int, budget: int) -> list[slice]:
    """Consecutive ranges over ``length`` items of ``item_bytes`` each, at most ``budget`` bytes a
    range (one item at least): how large tables and batches are worked through a block at a time."""
    step = max(1, budget // max(item_bytes, 1))
    return [slice(i, i + step) for i in range(0, length, step)]
