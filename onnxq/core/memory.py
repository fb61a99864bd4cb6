"""Give freed memory back to the operating system between the pipeline's stages.

glibc keeps freed heap memory in its arenas; torch's per-window tensors (a few MB each) are served
from there once the allocator's dynamic mmap threshold has grown past them. After a stage that
made many of them (learning, the sensitivity pass) the process stays ~1 GB above what is live,
and the next stage's peak adds to it: on SmolLM2 ``--learn`` that was 1.1 GB of the 4.3 GB peak.
``malloc_trim`` returns those pages. Elsewhere (Windows, macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim() -> bool:
    """Hand free heap pages back to the OS (a few ms); True where that was possible."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
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
