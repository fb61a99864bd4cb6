"""Quantization as data: integer types, how a tensor is quantized (spec), and the numbers (encoding).

One quantizer is ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x̂ = (q - zero_point) * scale``
with round half to even, exactly as ONNX QuantizeLinear. A :class:`QuantSpec` says which integer
type, whether symmetric, and the granularity (per tensor, per channel along ``axis``, per block of
``block_size``); an :class:`Encoding` holds the scale and zero point that realise it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError


class QType(enum.Enum):
    """Integer types a QuantizeLinear can produce at opset 21."""

    UINT8 = "uint8"
    INT8 = "int8"
    UINT16 = "uint16"
    INT16 = "int16"
    INT4 = "int4"
    UINT4 = "uint4"

    @property
    def bits(self) -> int:
        return {"uint8": 8, "int8": 8, "uint16": 16, "int16": 16, "int4": 4, "uint4": 4}[self.value]

    @property
    def signed(self) -> bool:
        return self.value.startswith("int")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def onnx(self) -> ir.DataType:
        return getattr(ir.DataType, self.name)

    @property
    def numpy(self) -> Any:
        return {
            "uint8": np.uint8,
            "int8": np.int8,
            "uint16": np.uint16,
            "int16": np.int16,
            "int4": ml_dtypes.int4,
            "uint4": ml_dtypes.uint4,
        }[self.value]

    @classmethod
    def for_bits(cls, bits: int, *, signed: bool) -> QType:
        table = {
            (8, False): cls.UINT8,
            (8, True): cls.INT8,
            (16, False): cls.UINT16,
            (16, True): cls.INT16,
            (4, True): cls.INT4,
            (4, False): cls.UINT4,
        }
        if (bits, signed) not in table:
            raise OnnxqError(
                f"{bits}-bit {'signed' if signed else 'unsigned'} quantization is not supported", "use 4, 8 or 16 bits"
            )
        return table[(bits, signed)]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        qtype: the integer type.
        symmetric: zero point fixed at 0 (signed types) — required for weights and for the second
            input of a MatMul between two activations on the HTP.
        axis: per-channel axis, None for per-tensor.
        block_size: per-block size along ``axis`` (0: not blocked).
        limit: largest integer magnitude used, below the type's own (the HTP computes 8-bit
            per-channel FCs with 8-bit activations wrongly beyond ±63, see docs).
    """

    qtype: QType
    symmetric: bool = False
    axis: int | None = None
    block_size: int = 0
    limit: int | None = None

    @property
    def bits(self) -> int:
        return self.qtype.bits

    @property
    def channel_axis(self) -> int:
        """Blocked 2-D weights: the output-channel axis, the one the blocks do not run along."""
        assert self.block_size and self.axis is not None
        return 1 - self.axis % 2

    @property
    def qmin(self) -> int:
        return -self.limit if self.limit is not None else self.qtype.qmin

    @property
    def qmax(self) -> int:
        return self.limit if self.limit is not None else self.qtype.qmax

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.qtype.value, "symmetric": self.symmetric}
        if self.axis is not None:
            out["axis"] = self.axis
        if self.block_size:
            out["block_size"] = self.block_size
        if self.limit is not None:
            out["limit"] = self.limit
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(
            QType(data["dtype"]),
            bool(data.get("symmetric", False)),
            data.get("axis"),
            int(data.get("block_size", 0)),
            data.get("limit"),
        )


@dataclass(frozen=True)
class Encoding:
    """Scale and zero point realising a :class:`QuantSpec`."""

    spec: QuantSpec
    scale: np.ndarray
    zero_point: np.ndarray
    #: LPBQ (blocked weights only): one float scale per output channel, ``scale`` being an integer
    #: multiple of it (1..16) in every block, as Qualcomm's HTP stores 4-bit blocked weights.
    channel_scale: np.ndarray | None = None

    @property
    def qtype(self) -> QType:
        return self.spec.qtype

    @property
    def block_ints(self) -> np.ndarray:
        """LPBQ: the per-block integer scales (``scale / channel_scale``), shaped like ``scale``."""
        assert self.channel_scale is not None
        shape = [1, 1]
        shape[self.spec.channel_axis] = -1
        ints = np.rint(np.asarray(self.scale, np.float64) / self.channel_scale.reshape(shape))
        return ints.astype(np.uint8)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Integers as ONNX QuantizeLinear gives them (float division, round half to even)."""
        scale, zp = self._broadcast(x)
        q = x.astype(np.float32)  # a copy, worked on in place: one weight-sized temporary, not five
        np.divide(q, scale, out=q)
        np.rint(q, out=q)
        q += zp
        return np.clip(q, self.spec.qmin, self.spec.qmax, out=q)

    def unrounded(self, x: np.ndarray) -> np.ndarray:
        """``x / scale``, before the rounding and zero point :meth:`quantize` adds: where each value
        lies between two codes."""
        scale, _ = self._broadcast(x)
        return np.divide(x.astype(np.float32), scale)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale, zp = self._broadcast(q)
        x = q.astype(np.float32)
        x -= zp
        x *= scale
        return x

    def fake(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(x))

    def _broadcast(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = self.scale.astype(np.float32)
        zp = self.zero_point.astype(np.float32)
        if scale.ndim == 0 or self.spec.axis is None:
            return scale.reshape(()), zp.reshape(())
        axis = self.spec.axis % x.ndim
        if self.spec.block_size:
            scale = np.repeat(scale, self.spec.block_size, axis=axis)
            zp = np.repeat(zp, self.spec.block_size, axis=axis)
            return scale, zp
        shape = [1] * x.ndim
        shape[axis] = -1
        return scale.reshape(shape), zp.reshape(shape)

    def range(self) -> tuple[float, float]:
        """The float interval this encoding represents (per-tensor encodings)."""
        s = float(np.asarray(self.scale).reshape(-1)[0])
        z = float(np.asarray(self.zero_point).reshape(-1)[0])
        return (self.spec.qtype.qmin - z) * s, (self.spec.qtype.qmax - z) * s

    def with_spec(self, spec: QuantSpec) -> Encoding:
        """The same float range expressed in another integer type (for a convert)."""
        lo, hi = self.range()
        return from_range(spec, lo, hi)

    def to_json(self) -> dict[str, Any]:
        out = {
            **self.spec.to_json(),
            "scale": np.asarray(self.scale, dtype=np.float64).round(12).tolist(),
            "zero_point": np.asarray(self.zero_point).astype(np.int64).tolist(),
        }
        if self.channel_scale is not None:  # exact float32 values: scale is rebuilt from them
            out["channel_scale"] = np.asarray(self.channel_scale, dtype=np.float32).astype(np.float64).tolist()
            out["block_ints"] = self.block_ints.astype(np.int64).tolist()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Encoding:
        spec = QuantSpec.from_json(data)
        zp = np.asarray(data["zero_point"]).astype(np.int64)
        if "channel_scale" in data:
            return lpbq(spec, np.asarray(data["block_ints"]), np.asarray(data["channel_scale"], dtype=np.float32))
        return cls(spec, np.asarray(data["scale"], dtype=np.float32), zp)


def lpbq(spec: QuantSpec, block_ints: np.ndarray, channel_scale: np.ndarray) -> Encoding:
    """The LPBQ encoding ``scale = block_ints * channel_scale`` (in float32, as DequantizeLinear computes it)."""
    shape = [1, 1]
    shape[spec.channel_axis] = -1
    cs = np.asarray(channel_scale, dtype=np.float32).reshape(-1)
    ints = np.asarray(block_ints).astype(np.uint8)
    scale = (ints.astype(np.float32) * cs.reshape(shape)).astype(np.float32)
    return Encoding(spec, scale, np.zeros(scale.shape, np.int64), cs)


def from_range(spec: QuantSpec, lo: float | np.ndarray, hi: float | np.ndarray) -> Encoding:
    """The encoding covering [lo, hi] (arrays for per-channel), zero included as ONNX requires."""
    lo_a = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi_a = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(lo_a)) and np.all(np.isfinite(hi_a))):
        raise OnnxqError(
            "a quantization range is NaN or infinite",
            "check the calibration data and the float model for NaN/inf outputs",
        )
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = np.maximum(np.abs(lo_a), np.abs(hi_a))
        if spec.qtype.signed:
            scale = amax / qmax
            zp = np.zeros_like(scale)
        else:  # unsigned symmetric: a non-negative tensor (softmax output) from 0
            scale = hi_a / qmax
            zp = np.zeros_like(scale)
    else:
        scale = (hi_a - lo_a) / (qmax - qmin)
        scale = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(qmin - lo_a / scale), qmin, qmax)
    scale = np.where(scale > 0, scale, np.finfo(np.float32).tiny * 1e10)
    return Encoding(spec, scale.astype(np.float32), zp.astype(np.int64))
