"""Encodings files in AIMET's formats, for Qualcomm's own converter (``--quantization_overrides``).

A float model plus such a file describe the same quantization as the QDQ model: every quantized
tensor of the float graph with its bit width, symmetry, scale and offset. AIMET stores integers
unsigned, so ``offset = -zero_point`` of the unsigned form: a signed symmetric int8 tensor (zero
point 0) has offset -128, int4 -8, int16 -32768.

Formats: 0.6.1 (dicts keyed by tensor name, one entry per channel) and 1.0.0 (lists of entries
with ``enc_type`` PER_TENSOR / PER_CHANNEL). :func:`read` turns either back into onnxq encodings,
which is how the round trip is tested (float + encodings -> QDQ == the QDQ model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.plan import QuantPlan
from onnxq.qtypes import Encoding, QType, QuantSpec

VERSIONS = ("1.0.0", "0.6.1")


def _unsigned_offset(enc: Encoding) -> np.ndarray:
    """AIMET's offset: minus the zero point in the unsigned representation of the type."""
    zp = np.asarray(enc.zero_point, dtype=np.int64)
    shift = -enc.qtype.qmin if enc.qtype.signed else 0
    return -(zp + shift)


def _from_unsigned(bits: int, signed: bool, offset: np.ndarray) -> np.ndarray:
    shift = (1 << (bits - 1)) if signed else 0
    return -np.asarray(offset, dtype=np.int64) - shift


def _qtype(bits: int, signed: bool) -> QType:
    return QType.for_bits(bits, signed=signed)


def tensor_encodings(
    plan: QuantPlan, encodings: Mapping[str, Encoding]
) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """(activation, parameter) encodings keyed by the float graph's tensor names."""
    acts: dict[str, Encoding] = {}
    params: dict[str, Encoding] = {}
    for point in plan.points.values():
        if point.kind == "convert":
            continue  # lives on an edge; QAIRT inserts converts where two encodings meet
        enc = encodings[point.name]
        target = params if point.kind in ("weight", "const") else acts
        for tensor in point.tensors:
            acts[tensor] = enc
        for const in point.consts:
            target[const] = enc
    return acts, params


def write(plan: QuantPlan, encodings: Mapping[str, Encoding], path: Path, version: str = "1.0.0") -> dict[str, Any]:
    """Write the AIMET encodings file for ``plan`` and return its content."""
    if version not in VERSIONS:
        raise OnnxqError(f"unknown encodings version {version!r}", f"use one of: {', '.join(VERSIONS)}")
    acts, params = tensor_encodings(plan, encodings)
    data = _v1(acts, params) if version == "1.0.0" else _v061(acts, params)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def _entry_v1(name: str, enc: Encoding) -> dict[str, Any]:
    scale = np.atleast_1d(np.asarray(enc.scale, dtype=np.float64))
    per_channel = enc.spec.axis is not None and scale.size > 1
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "PER_CHANNEL" if per_channel else "PER_TENSOR",
        "bw": enc.qtype.bits,
        "is_sym": bool(enc.spec.symmetric),
        "scale": scale.tolist(),
        "offset": np.atleast_1d(_unsigned_offset(enc)).tolist(),
        **({"axis": int(enc.spec.axis)} if per_channel and enc.spec.axis is not None else {}),
    }


def _v1(acts: Mapping[str, Encoding], params: Mapping[str, Encoding]) -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "activation_encodings": [_entry_v1(n, e) for n, e in acts.items()],
        "param_encodings": [_entry_v1(n, e) for n, e in params.items()],
    }


def _entries_v061(enc: Encoding) -> list[dict[str, Any]]:
    scales = np.atleast_1d(np.asarray(enc.scale, dtype=np.float64))
    offsets = np.atleast_1d(_unsigned_offset(enc))
    out = []
    for s, o in zip(scales, offsets, strict=True):
        levels = (1 << enc.qtype.bits) - 1
        out.append(
            {
                "bitwidth": enc.qtype.bits,
                "dtype": "int",
                "is_symmetric": str(bool(enc.spec.symmetric)),
                "scale": float(s),
                "offset": int(o),
                "min": float(o * s),
                "max": float((o + levels) * s),
            }
        )
    return out


def _v061(acts: Mapping[str, Encoding], params: Mapping[str, Encoding]) -> dict[str, Any]:
    return {
        "version": "0.6.1",
        "activation_encodings": {n: _entries_v061(e) for n, e in acts.items()},
        "param_encodings": {n: _entries_v061(e) for n, e in params.items()},
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": 16,
            "param_bitwidth": 8,
            "dtype": "int",
            "per_channel_quantization": True,
        },
    }


def read(path: Path) -> dict[str, Encoding]:
    """Tensor name -> onnxq encoding, from an AIMET 0.6.1 or 1.0.0 file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OnnxqError(
            f"cannot read encodings {path} ({type(exc).__name__})", "pass an AIMET encodings JSON"
        ) from None
    out: dict[str, Encoding] = {}
    version = str(data.get("version", ""))
    if version.startswith("1."):
        for section in ("activation_encodings", "param_encodings"):
            for e in data.get(section, []):
                bits, sym = int(e["bw"]), bool(e["is_sym"])
                signed = sym  # onnxq's symmetric tensors are signed (weights, K, V)
                scale = np.asarray(e["scale"], dtype=np.float32)
                zp = _from_unsigned(bits, signed, np.asarray(e["offset"]))
                per_channel = e.get("enc_type") == "PER_CHANNEL"
                spec = QuantSpec(_qtype(bits, signed), symmetric=sym, axis=e.get("axis", 1) if per_channel else None)
                out[e["name"]] = Encoding(
                    spec, scale if per_channel else scale.reshape(()), zp if per_channel else zp.reshape(())
                )
    elif version.startswith("0.6"):
        for section in ("activation_encodings", "param_encodings"):
            for name, entries in data.get(section, {}).items():
                bits = int(entries[0]["bitwidth"])
                sym = entries[0]["is_symmetric"] in (True, "True")
                signed = sym
                scale = np.asarray([e["scale"] for e in entries], dtype=np.float32)
                zp = _from_unsigned(bits, signed, np.asarray([e["offset"] for e in entries]))
                per_channel = len(entries) > 1
                spec = QuantSpec(_qtype(bits, signed), symmetric=sym, axis=1 if per_channel else None)
                out[name] = Encoding(
                    spec, scale if per_channel else scale.reshape(()), zp if per_channel else zp.reshape(())
                )
    else:
        raise OnnxqError(f"{path} is not an AIMET encodings file (version {version!r})", "pass 0.6.1 or 1.0.0")
    return out
