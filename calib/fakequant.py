"""Differentiable quantizers whose forward pass is exactly what the emitted QDQ model computes.

``round`` passes gradients straight through (STE). With the range parametrised by its ends, the
gradient reaching the scale is ``round(x/s) - x/s`` inside the range and the clip bound outside:
LSQ's gradient (LSQ+ with the offset learned too). Writing back turns the same formulas into an
:class:`~onnxq.core.qtypes.Encoding`, so training and deployment see the same integers.
"""

from __future__ import annotations

import numpy as np
import torch

from onnxq.core.encodings import lpbq_snap
from onnxq.core.qtypes import Encoding, QuantSpec, from_range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The STE graph's forward in place, one temporary instead of seven (round_ste's forward is round
    exactly: ``x + (round(x) - x)`` is exact in floating point)."""
    return (x / scale).round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)


class _FixedRange(torch.autograd.Function):
    """Fake-quantization with a fixed range, differentiable in ``x``: saves ``x`` alone and recomputes
    the clip mask in backward, where the STE graph records seven operations and keeps the clamp's input.
    The gradient is the STE graph's, operation for operation: ``where(inside, g·s, 0) / s``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scale, zp)
        ctx.bounds = (qmin, qmax)
        return _fake_quant(x, scale, zp, qmin, qmax)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        x, scale, zp = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        v = (x / scale).round_().add_(zp)
        inside = (v >= qmin).logical_and_(v <= qmax)
        return torch.where(inside, grad * scale, 0.0) / scale, None, None, None, None


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
        qmin, qmax = self.spec.qtype.qmin, self.spec.qtype.qmax
        if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
            return _fake_quant(x, scale, zp, qmin, qmax)
        if not scale.requires_grad:  # the range is fixed: the gradient reaches x alone
            return _FixedRange.apply(x, scale, zp, qmin, qmax)
        q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
        return (q - zp) * scale

    def encoding(self) -> Encoding:
        lo, hi = self.bounds()
        return from_range(self.spec, float(lo.detach()), float(hi.detach()))


def _abs_max(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``|x|.amax(dims)``; where no gradient is wanted, from the max and the min (the same values)
    instead of through ``|x|``, a temporary the size of the weight."""
    if x.requires_grad and torch.is_grad_enabled():
        return x.abs().amax(dim=dims)
    return torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg_())


class WeightQuant(torch.nn.Module):
    """Symmetric weight quantizer with a learnable clip ratio per channel (LWC), or per block of
    input rows for LPBQ weights (the two-level snapping of the block scales happens on write-back)."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, encoding: Encoding) -> None:
        super().__init__()
        assert spec.axis is not None
        self.spec = spec
        self.axis = spec.axis % weight.dim()
        amax = self._amax(weight.detach())
        scale = torch.as_tensor(np.asarray(encoding.scale), dtype=torch.float64)
        init = scale * spec.qmax / amax.double().clamp_min(1e-12)
        # LPBQ snapping may put a block's scale above its own max (a near-empty block gets the
        # channel's smallest step): let a sim built from snapped encodings reproduce them
        self.max_ratio = 1e3 if spec.block_size else 1.0
        self.register_buffer("ratio0", init.clamp(1e-3, self.max_ratio))
        self.t = torch.nn.Parameter(torch.zeros_like(self.ratio0))  # clip ratio = ratio0 · e^t, at most 1

    def _amax(self, weight: torch.Tensor) -> torch.Tensor:
        """Largest magnitude per channel, or per block (shaped like the encoding's scale)."""
        if self.spec.block_size:
            rows = weight.movedim(self.axis, 0)  # [in, out]
            blocks = rows.reshape(rows.shape[0] // self.spec.block_size, self.spec.block_size, -1)
            amax = _abs_max(blocks, [1])
            return amax if self.axis == 0 else amax.T
        return _abs_max(weight, [d for d in range(weight.dim()) if d != self.axis])

    def scale(self, weight: torch.Tensor, columns: slice | None = None) -> torch.Tensor:
        """Per channel (or block); with ``columns``, those of ``weight``'s last axis only, given as
        ``weight`` (where the channels are that axis)."""
        ratio = torch.clamp(self.ratio0 * torch.exp(self.t), max=self.max_ratio).float()
        if columns is not None:
            ratio = ratio[..., columns]
        return torch.clamp(ratio * self._amax(weight) / self.spec.qmax, min=1e-12)

    def _steps(self, weight: torch.Tensor, columns: slice | None = None) -> torch.Tensor:
        """The scale of every element's channel (or block), shaped to broadcast against ``weight``."""
        scale = self.scale(weight, columns)
        if self.spec.block_size:
            return scale.repeat_interleave(self.spec.block_size, dim=self.axis)
        shape = [1] * weight.dim()
        shape[self.axis] = -1
        return scale.reshape(shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self._steps(weight)
        q = torch.clamp(round_ste(weight / s), self.spec.qmin, self.spec.qmax)
        return q * s

    @torch.no_grad()
    def frozen(self, weight: torch.Tensor, part: slice | torch.Tensor | None = None) -> torch.Tensor:
        """What :meth:`forward` gives, for a weight no gradient flows into, in place on one copy: a
        128k-vocabulary lm_head would otherwise pass through four temporaries of its size. ``part``: a block
        of the last axis (a slice) or entries of the first (a tensor of indices)."""
        if isinstance(part, slice) and weight.dim() == 2 and self.axis == (0 if self.spec.block_size else 1):
            return self._rounded(weight[:, part], part)  # the channels lie along that axis: the block alone
        whole = self._rounded(weight)
        if part is None:
            return whole
        return whole[..., part] if isinstance(part, slice) else whole.index_select(0, part)

    def _rounded(self, weight: torch.Tensor, columns: slice | None = None) -> torch.Tensor:
        if self.spec.block_size and self.axis == 0 and weight.dim() == 2:  # blocks of rows, seen as a view:
            view = weight.reshape(-1, self.spec.block_size, weight.shape[1])  # no scale of the weight's size
            s = self.scale(weight, columns).unsqueeze(1)
        else:
            view, s = weight, self._steps(weight, columns)
        return (view / s).round_().clamp_(self.spec.qmin, self.spec.qmax).mul_(s).reshape(weight.shape)

    def encoding(self, weight: torch.Tensor) -> Encoding:
        weight = weight.detach().to(self.ratio0.device)
        scale = self.scale(weight).detach().double().cpu().numpy()
        if self.spec.block_size:
            return lpbq_snap(weight.double().cpu().numpy(), self.spec, scale)
        scale = scale.astype(np.float32)
        return Encoding(self.spec, scale, np.zeros(scale.shape, dtype=np.int64))


def fixed(encoding: Encoding, x: torch.Tensor, part: slice | torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize a constant with a frozen encoding (no gradient flows through it); with ``part``, only
    that block of its last axis (a slice) or those entries of its first (a tensor of indices)."""
    scale = torch.as_tensor(np.asarray(encoding.scale), dtype=torch.float32)
    zp = torch.as_tensor(np.asarray(encoding.zero_point), dtype=torch.float32)
    if scale.dim() and encoding.spec.axis is not None:
        shape = [1] * x.dim()
        shape[encoding.spec.axis % x.dim()] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    if part is not None:
        x, scale, zp = (_part(t, part) for t in (x, scale, zp))
    # in place on one copy: an embedding table would otherwise pass through five temporaries of its size
    with torch.no_grad():
        return (x / scale).round_().add_(zp).clamp_(encoding.qtype.qmin, encoding.qtype.qmax).sub_(zp).mul_(scale)


def _part(x: torch.Tensor, part: slice | torch.Tensor) -> torch.Tensor:
    """``part`` of ``x`` (as :func:`fixed` takes it), where ``x`` varies along that axis; else ``x`` itself."""
    if isinstance(part, slice):
        return x[..., part] if x.dim() and x.shape[-1] > 1 else x
    return x.index_select(0, part) if x.dim() and x.shape[0] > 1 else x
