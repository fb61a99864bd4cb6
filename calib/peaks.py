"""Per-channel peaks |x| of chosen activations over calibration windows (one float pass, fixed memory).

What :func:`rewrites.outliers.choose_channels` needs to pick the outlier channels of down_proj inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import torch

from calib.mirror import Mirror


def channel_peaks(model: ir.Model, tensors: Sequence[str], windows: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """``max |x|`` over all tokens of each tensor in ``tensors``, per last-axis channel."""
    mirror = Mirror(model)
    wanted = set(tensors)
    peaks: dict[str, torch.Tensor] = {}

    def tap(name: str, value: torch.Tensor) -> None:
        if name in wanted:
            p = value.detach().abs().reshape(-1, value.shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], p) if name in peaks else p

    with torch.inference_mode():
        for window in windows:
            mirror.run(mirror.window(window), tap=tap)
    return {k: v.double().numpy() for k, v in peaks.items()}
