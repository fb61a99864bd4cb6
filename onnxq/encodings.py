"""Computing encodings from numbers we already have: weights and constants.

Activations get theirs from calibration (:mod:`calib.calibrate`); weights and the constants that
meet activations (RoPE tables, the mask, eps) are known, so their encodings are computed here.
"""

from __future__ import annotations

import numpy as np

from onnxq.qtypes import Encoding, QuantSpec, from_range

#: clip ratios searched per output channel for weights (1.0 = plain max)
CLIP_RATIOS = np.linspace(1.0, 0.55, 19)


def const_encoding(spec: QuantSpec, *arrays: np.ndarray) -> Encoding:
    """Per-tensor encoding covering constants exactly (min/max)."""
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    return from_range(spec, lo, hi)


def weight_encoding(weight: np.ndarray, spec: QuantSpec, method: str = "mse") -> Encoding:
    """Symmetric per-channel (or per-tensor) weight encoding.

    ``mse`` picks, per output channel, the clip ratio that minimises the squared rounding error of
    that channel; at 4 bits it typically cuts the weight error by a third against plain max.
    """
    w = np.asarray(weight, dtype=np.float32)
    if spec.axis is None:
        amax = np.array(np.abs(w).max())
        return from_range(spec, -amax, amax)
    axis = spec.axis % w.ndim
    moved = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis])  # [rows, channels]
    amax = np.abs(moved).max(axis=0)
    amax = np.where(amax > 0, amax, 1e-8)
    if method == "minmax":
        return from_range(spec, -amax, amax)
    qmax = spec.qmax
    best_err = np.full(amax.shape, np.inf)
    best_amax = amax.copy()
    for ratio in CLIP_RATIOS:
        a = amax * ratio
        scale = a / qmax
        q = np.clip(np.rint(moved / scale), spec.qmin, spec.qmax)
        err = ((q * scale - moved) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_amax = np.where(better, a, best_amax)
    return from_range(spec, -best_amax, best_amax)
