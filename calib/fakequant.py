"""Differentiable quantizers whose forward pass is exactly what the emitted QDQ model computes.

``round`` passes gradients straight through (STE). With the range parametrised by its ends, the
gradient reaching the scale is ``round(x/s) - x/s`` inside the range and the clip bound outside:
LSQ's gradient (LSQ+ with the offset learned too). Writing back turns the same formulas into an
:class:`~onnxq.qtypes.Encoding`, so training and deployment see the same integers.
"""

from __future__ import annotations

import numpy as np
import torch

from onnxq.qtypes import Encoding, QuantSpec, from_range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class ActQuant(torch.nn.Module):
    """Per-tensor activation quantizer with a learnable range [lo, hi] (0 always inside).

    The ends are learned as log-factors of their initial values (``lo = lo0 · e^t``), so one
    learning rate fits tensors whose ranges differ by orders of magnitude.
    """

    def __init__(self, spec: QuantSpec, encoding: Encoding) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.reset(encoding)

    def reset(self, encoding: Encoding) -> None:
        """Start again from ``encoding``'s range (stage 2 calibration, checkpoints)."""
        lo, hi = encoding.range()
        if self.spec.symmetric and self.spec.qtype.signed:  # defined by ±qmax·scale, not [qmin, qmax]
            amax = float(np.asarray(encoding.scale).reshape(-1)[0]) * self.spec.qmax
            lo, hi = -amax, amax
        self.register_buffer("lo0", torch.tensor(min(float(lo), 0.0), dtype=torch.float64))
        self.register_buffer("hi0", torch.tensor(max(float(hi), 0.0), dtype=torch.float64))
        self.t_lo = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.t_hi = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.lo0 * torch.exp(self.t_lo)
        hi = self.hi0 * torch.exp(self.t_hi)
        if self.spec.symmetric and self.spec.qtype.signed:
            amax = torch.maximum(-lo, hi)
            return -amax, amax
        return lo, hi

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and (STE-rounded) zero point, as ``from_range`` computes them."""
        lo, hi = self.bounds()
        qmin, qmax = self.spec.qmin, self.spec.qmax
        if self.spec.symmetric and self.spec.qtype.signed:
            scale = torch.clamp(hi / qmax, min=1e-12)
            return scale.float(), torch.zeros((), dtype=torch.float32)
        if self.spec.symmetric:
            return torch.clamp(hi / qmax, min=1e-12).float(), torch.zeros((), dtype=torch.float32)
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=1e-12)
        zp = torch.clamp(round_ste(qmin - lo / scale), qmin, qmax)
        return scale.float(), zp.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        scale, zp = self.scale_zero()
        q = torch.clamp(round_ste(x / scale) + zp, self.spec.qtype.qmin, self.spec.qtype.qmax)
        return (q - zp) * scale

    def encoding(self) -> Encoding:
        lo, hi = self.bounds()
        return from_range(self.spec, float(lo.detach()), float(hi.detach()))


class WeightQuant(torch.nn.Module):
    """Symmetric per-channel weight quantizer with a learnable clip ratio per channel (LWC)."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, encoding: Encoding) -> None:
        super().__init__()
        assert spec.axis is not None
        self.spec = spec
        self.axis = spec.axis % weight.dim()
        amax = weight.detach().abs().amax(dim=[d for d in range(weight.dim()) if d != self.axis])
        scale = torch.as_tensor(np.asarray(encoding.scale), dtype=torch.float64)
        init = scale * spec.qmax / amax.double().clamp_min(1e-12)
        self.register_buffer("ratio0", init.clamp(1e-3, 1.0))
        self.t = torch.nn.Parameter(torch.zeros_like(self.ratio0))  # clip ratio = ratio0 · e^t, at most 1

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(weight.dim()) if d != self.axis]
        amax = weight.abs().amax(dim=dims)
        ratio = torch.clamp(self.ratio0 * torch.exp(self.t), max=1.0).float()
        return torch.clamp(ratio * amax / self.spec.qmax, min=1e-12)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale(weight)
        shape = [1] * weight.dim()
        shape[self.axis] = -1
        s = scale.reshape(shape)
        q = torch.clamp(round_ste(weight / s), self.spec.qmin, self.spec.qmax)
        return q * s

    def encoding(self, weight: torch.Tensor) -> Encoding:
        scale = self.scale(weight.detach()).detach().double().numpy().astype(np.float32)
        return Encoding(self.spec, scale, np.zeros(scale.shape, dtype=np.int64))


def fixed(encoding: Encoding, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize with a frozen encoding (constants, stage-2 points)."""
    scale = torch.as_tensor(np.asarray(encoding.scale), dtype=torch.float32)
    zp = torch.as_tensor(np.asarray(encoding.zero_point), dtype=torch.float32)
    if scale.dim() and encoding.spec.axis is not None:
        shape = [1] * x.dim()
        shape[encoding.spec.axis % x.dim()] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = torch.clamp(torch.round(x / scale) + zp, encoding.qtype.qmin, encoding.qtype.qmax)
    return (q - zp) * scale
