"""Computing encodings from numbers we already have: weights and constants.

Activations get theirs from calibration (:mod:`calib.calibrate`); weights and the constants that
meet activations (RoPE tables, the mask, eps) are known, so their encodings are computed here.
"""

from __future__ import annotations

import numpy as np

from onnxq.core.errors import OnnxqError
from onnxq.core.memory import slices
from onnxq.core.qtypes import Encoding, QuantSpec, from_range, lpbq

#: clip ratios searched per output channel for weights (1.0 = plain max)
CLIP_RATIOS = np.linspace(1.0, 0.55, 19)
#: float64 bytes of weight searched at once: channels are independent, and a 128k-vocabulary lm_head
#: searched whole holds several float copies of itself
CHUNK_BYTES = 1 << 26


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
    if spec.block_size:
        return lpbq_encoding(w, spec, method)
    if spec.axis is None:
        amax = np.array(np.abs(w).max())
        return from_range(spec, -amax, amax)
    axis = spec.axis % w.ndim
    moved = np.moveaxis(w, axis, -1).reshape(-1, w.shape[axis])  # [rows, channels]
    amax = np.abs(moved).max(axis=0)
    amax = np.where(amax > 0, amax, 1e-8)
    if method == "minmax":
        return from_range(spec, -amax, amax)
    best_amax = amax.astype(np.float64)  # the clipped maxima are float64 (amax x a float64 ratio)
    for cols in slices(moved.shape[1], 8 * moved.shape[0], CHUNK_BYTES):  # float64 channels
        best_amax[cols] = _mse_amax(moved[:, cols], amax[cols], spec)
    return from_range(spec, -best_amax, best_amax)


def _mse_amax(moved: np.ndarray, amax: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Per channel (column of ``moved``), the clipped max with the least squared rounding error."""
    best_err = np.full(amax.shape, np.inf)
    best_amax = amax.copy()
    for ratio in CLIP_RATIOS:
        a = amax * ratio
        scale = a / spec.qmax
        q = np.clip(np.rint(moved / scale), spec.qmin, spec.qmax)
        err = ((q * scale - moved) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_amax = np.where(better, a, best_amax)
    return best_amax


#: LPBQ block scales are integers 1..16 times the channel's float scale (4 bits, as AIMET and QNN use)
LPBQ_LEVELS = 16


def lpbq_encoding(weight: np.ndarray, spec: QuantSpec, method: str = "mse") -> Encoding:
    """Per-block weight encoding in Qualcomm's low-power form (LPBQ) for a 2-D weight.

    Each block of ``spec.block_size`` input rows gets its own clip (MSE search, as per channel);
    :func:`lpbq_snap` then puts the block scales on the two-level grid the HTP runs.
    """
    blocks = _blocks(weight, spec)
    amax = np.abs(blocks).max(axis=1)
    amax = np.where(amax > 0, amax, 1e-8)
    best = amax / spec.qmax
    if method != "minmax":
        best_err = _block_error(blocks, best, spec)
        for ratio in CLIP_RATIOS[1:]:
            cand = amax * ratio / spec.qmax
            err = _block_error(blocks, cand, spec)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, cand, best)
    return _snap(blocks, best, spec)


def lpbq_snap(weight: np.ndarray, spec: QuantSpec, block_scale: np.ndarray) -> Encoding:
    """The LPBQ encoding nearest to free per-block scales (shaped ``[in / block, out]`` for axis 0)."""
    scale = np.asarray(block_scale, dtype=np.float64)
    return _snap(_blocks(weight, spec), scale if spec.axis % 2 == 0 else scale.T, spec)


def _blocks(weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The weight as ``[blocks, block_size, out]`` (blocks along the input rows)."""
    assert spec.block_size and spec.axis is not None
    w = np.asarray(weight, dtype=np.float64)
    w = w if spec.axis % 2 == 0 else w.T  # [in, out]
    rows, cols = w.shape
    if rows % spec.block_size:
        raise OnnxqError(
            f"a weight with {rows} input rows does not split into blocks of {spec.block_size}",
            "pick a --weight-block that divides every linear's input size, or 0 for per-channel",
        )
    return w.reshape(rows // spec.block_size, spec.block_size, cols)


def _block_error(blocks: np.ndarray, scale: np.ndarray, spec: QuantSpec) -> np.ndarray:
    q = np.clip(np.rint(blocks / scale[:, None, :]), spec.qmin, spec.qmax)
    return ((q * scale[:, None, :] - blocks) ** 2).sum(axis=1)


def _snap(blocks: np.ndarray, best: np.ndarray, spec: QuantSpec) -> Encoding:
    """Block scales as integers 1..16 times the channel's largest / 16; each integer rounded down
    or up, whichever leaves the smaller error in its block."""
    channel = (best.max(axis=0) / LPBQ_LEVELS).astype(np.float32).astype(np.float64)
    low = np.clip(np.floor(best / channel), 1, LPBQ_LEVELS)
    high = np.clip(low + 1, 1, LPBQ_LEVELS)
    ints = np.where(_block_error(blocks, high * channel, spec) < _block_error(blocks, low * channel, spec), high, low)
    return lpbq(spec, ints if spec.axis % 2 == 0 else ints.T, channel.astype(np.float32))
