"""Cost measurements reported in summaries and benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where the OS does not say).

    On Linux this is VmHWM, the peak of this process's own address space: ``ru_maxrss`` survives
    ``exec`` and would report the parent's memory for a child started from a big process.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
