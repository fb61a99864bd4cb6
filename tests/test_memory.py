"""Freed heap memory goes back to the OS between stages (what kept --learn's peak at 4.3 GB)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from onnxq.core import memory


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_fragmented_heap_pages() -> None:
    """Blocks under the mmap threshold live in the heap; with every 16th kept alive, the freed ones
    between cannot shrink it from the top, so the process keeps them until they are trimmed."""
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MiB
    kept = blocks[::16]
    del blocks
    before = _rss_mb()
    assert memory.release()
    after = _rss_mb()
    assert before - after > 150  # measured: 264 -> 31 MiB
    assert len(kept) == 250


def test_release_is_a_no_op_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    memory._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "win32")
    try:
        assert memory.release() is False
    finally:
        memory._malloc_trim.cache_clear()
