"""Streaming range observers: fixed memory however many windows are seen.

An observer keeps a running min/max and, when asked, a histogram of fixed size whose range grows by
merging neighbouring bins, so calibration never holds more than one window's activations and its
memory does not grow with the number of windows. Ranges are chosen from these statistics by
``minmax``, ``percentile`` or ``mse`` (the clipping range minimising the expected squared
quantization error under the histogram).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BINS = 2048
METHODS = ("minmax", "percentile", "mse", "aware")
#: ACIQ's optimal clipping for a Gaussian, in standard deviations, by bit width (Banner et al.)
GAUSSIAN_CLIP = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}


@dataclass
class RangeStats:
    """What an observer reports for one chosen range."""

    lo: float
    hi: float
    clipped: float  # fraction of observed values outside [lo, hi]


class Observer:
    """Running min/max and, with ``histogram=True``, a self-extending histogram."""

    def __init__(self, histogram: bool = True, bins: int = BINS) -> None:
        self.histogram = histogram
        self.bins = bins
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0
        self.sum = 0.0
        self.sumsq = 0.0
        self.nonfinite = 0
        self.hist: torch.Tensor | None = None
        self.start = 0.0
        self.width = 0.0  # of one bin

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point():
            return
        x = x.float().reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))  # NaN and inf show here: one pass in the common case
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = torch.isfinite(x)
            self.nonfinite += int((~finite).sum())
            x = x[finite]
            if x.numel() == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += x.numel()
        self.sum += float(x.sum(dtype=torch.float64))  # accumulated in float64 without a float64 copy
        self.sumsq += float((x * x).sum(dtype=torch.float64))
        if self.histogram:
            self._hist_update(x, lo, hi)

    def _hist_update(self, x: torch.Tensor, lo: float, hi: float) -> None:
        if self.hist is None:
            span = hi - lo
            if span <= 0:
                span = max(abs(hi), 1e-6) * 1e-3
            self.start = lo
            self.width = span / self.bins * (1 + 1e-6)
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        else:
            self._extend(lo, hi)
        end = self.start + self.width * self.bins
        counts = torch.histc(x, bins=self.bins, min=self.start, max=end)
        self.hist += counts.double()

    def _extend(self, lo: float, hi: float) -> None:
        """Grow the range to cover [lo, hi] by merging 2^k bins into one (exact, aligned)."""
        assert self.hist is not None
        end = self.start + self.width * self.bins
        if lo >= self.start and hi <= end:
            return
        k = 0
        while True:
            k += 1
            w = self.width * (1 << k)
            shift = max(0, math.ceil((self.start - lo) / w))
            new_start = self.start - shift * w
            if new_start + w * self.bins >= max(hi, end):
                break
        factor = 1 << k
        old = self.hist
        new = torch.zeros(self.bins, dtype=torch.float64)
        idx = shift + torch.arange(self.bins) // factor
        new.index_add_(0, idx.clamp_max(self.bins - 1), old)
        self.hist, self.start, self.width = new, new_start, w

    # ------------------------------------------------------------------ choosing a range
    def stats(
        self, method: str, qmax_levels: int, *, symmetric: bool = False, signed: bool = False, percentile: float = 99.99
    ) -> RangeStats:
        """The range a quantizer with ``qmax_levels`` steps should use."""
        if self.count == 0:
            return RangeStats(0.0, 0.0, 0.0)
        if method == "minmax" or self.hist is None:
            lo, hi = self.lo, self.hi
        elif method == "percentile":
            lo, hi = self._percentile(percentile)
        elif method == "mse":
            lo, hi = self._mse(qmax_levels, symmetric=symmetric and signed)
        elif method == "aware":
            lo, hi = self._gaussian(qmax_levels)
        else:
            raise ValueError(method)
        if symmetric and signed:
            amax = max(abs(lo), abs(hi))
            lo, hi = -amax, amax
        return RangeStats(lo, hi, self.clipped_fraction(lo, hi))

    def _gaussian(self, levels: int) -> tuple[float, float]:
        """Quant.npu's rotation-aware start: mean ± k·std, k by bit width; the min/max beyond 8 bits."""
        bits = round(math.log2(levels + 1))
        k = GAUSSIAN_CLIP.get(bits)
        if k is None:
            return self.lo, self.hi
        mean = self.sum / self.count
        std = math.sqrt(max(self.sumsq / self.count - mean * mean, 0.0))
        return max(self.lo, mean - k * std), min(self.hi, mean + k * std)

    def _centers(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.hist is not None
        counts = self.hist.numpy()
        centers = self.start + (np.arange(self.bins) + 0.5) * self.width
        return centers, counts

    def clipped_fraction(self, lo: float, hi: float) -> float:
        if self.hist is None or self.count == 0:
            return 0.0
        centers, counts = self._centers()
        out = counts[(centers < lo) | (centers > hi)].sum()
        return float(out / max(counts.sum(), 1.0))

    def _percentile(self, p: float) -> tuple[float, float]:
        centers, counts = self._centers()
        cdf = np.cumsum(counts) / counts.sum()
        tail = (1 - p / 100) / 2
        lo = float(centers[min(np.searchsorted(cdf, tail), self.bins - 1)]) - self.width / 2
        hi = float(centers[min(np.searchsorted(cdf, 1 - tail), self.bins - 1)]) + self.width / 2
        return max(lo, self.lo), min(hi, self.hi)

    def _mse(self, levels: int, *, symmetric: bool) -> tuple[float, float]:
        """Search clip ranges: one shrink ratio for both ends over a log grid, then each end alone.

        Expected error of a range [L, H] with step Δ = (H - L) / levels: clipping² outside,
        Δ²/12 inside, weighted by the histogram.
        """
        centers, counts = self._centers()
        keep = counts > 0
        c, n = centers[keep], counts[keep]
        lo0, hi0 = min(self.lo, 0.0), max(self.hi, 0.0)
        if symmetric:
            amax = max(-lo0, hi0)
            lo0, hi0 = -amax, amax

        def errors(pairs: np.ndarray) -> np.ndarray:
            L = pairs[:, :1]
            H = pairs[:, 1:]
            step = np.maximum(H - L, 1e-12) / levels
            below = np.minimum(c[None, :] - L, 0.0)
            above = np.maximum(c[None, :] - H, 0.0)
            inside = ((c[None, :] >= L) & (c[None, :] <= H)) * (step**2 / 12)
            return ((below**2 + above**2 + inside) * n[None, :]).sum(axis=1)

        ratios = np.geomspace(1e-3, 1.0, 90)
        pairs = np.stack([lo0 * ratios, hi0 * ratios], axis=1)
        best = pairs[int(np.argmin(errors(pairs)))]
        if not symmetric:  # refine each end around the joint optimum
            fine = np.geomspace(0.5, 2.0, 25)
            grid = np.stack(np.meshgrid(best[0] * fine, best[1] * fine, indexing="ij"), axis=-1).reshape(-1, 2)
            grid[:, 0] = np.maximum(grid[:, 0], lo0)
            grid[:, 1] = np.minimum(grid[:, 1], hi0)
            best = grid[int(np.argmin(errors(grid)))]
        return float(best[0]), float(best[1])
