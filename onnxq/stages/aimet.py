"""Encodings files in AIMET's formats, for Qualcomm's own converter (``--quantization_overrides``).

A float model plus such a file describe the same quantization as the QDQ model: every quantized
tensor of the float graph with its bit width, symmetry, scale and offset. AIMET stores integers
unsigned, so ``offset = -zero_point`` of the unsigned form: a signed symmetric int8 tensor (zero
point 0) has offset -128, int4 -8, int16 -32768.

Formats: 0.6.1 (dicts keyed by tensor name, one entry per channel) and 1.0.0 (lists of entries
with ``enc_type`` PER_TENSOR / PER_CHANNEL, and LPBQ for 4-bit blocked weights: a float scale per
channel plus ``per_block_int_scale``, 1..16 per block). :func:`read` turns either back into onnxq encodings,
which is how the round trip is tested (float + encodings -> QDQ == the QDQ model, with
:mod:`onnxq.stages.split`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError
from onnxq.core.files import write_text
from onnxq.core.qtypes import Encoding, QType, QuantSpec, lpbq

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


def write_tensors(
    activations: Mapping[str, Encoding], params: Mapping[str, Encoding], path: Path, version: str = "1.0.0"
) -> dict[str, Any]:
    """Write the AIMET encodings file for these tensors (see :func:`onnxq.stages.split.split`) and return it."""
    if version not in VERSIONS:
        raise OnnxqError(f"unknown encodings version {version!r}", f"use one of: {', '.join(VERSIONS)}")
    data = _v1(activations, params) if version == "1.0.0" else _v061(activations, params)
    write_text(path, json.dumps(data, indent=1) + "\n")
    return data


#: LPBQ's block integers take 4 bits: AIMET names the weight width ``compressed_bw`` and the width
#: of the per-channel grid the blocks decompress to (weight + scale bits) ``bw``
LPBQ_SCALE_BITS = 4


def _entry_lpbq(name: str, enc: Encoding) -> dict[str, Any]:
    assert enc.channel_scale is not None and enc.spec.axis is not None
    channels = int(np.asarray(enc.channel_scale).size)
    bw = enc.qtype.bits + LPBQ_SCALE_BITS
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": "LPBQ",
        "bw": bw,
        "compressed_bw": enc.qtype.bits,
        "block_size": int(enc.spec.block_size),
        "is_sym": True,
        "scale": np.asarray(enc.channel_scale, dtype=np.float64).reshape(-1).tolist(),
        "offset": [-(1 << (bw - 1))] * channels,
        "per_block_int_scale": enc.block_ints.reshape(-1).astype(np.int64).tolist(),
        "axis": int(enc.spec.axis),
    }


def _entry_v1(name: str, enc: Encoding) -> dict[str, Any]:
    if enc.channel_scale is not None:
        return _entry_lpbq(name, enc)
    scale = np.atleast_1d(np.asarray(enc.scale, dtype=np.float64))
    per_channel = enc.spec.axis is not None and scale.size > 1
    kind = "PER_BLOCK" if per_channel and enc.spec.block_size else "PER_CHANNEL" if per_channel else "PER_TENSOR"
    return {
        "name": name,
        "dtype": "INT",
        "enc_type": kind,
        **({"block_size": int(enc.spec.block_size)} if kind == "PER_BLOCK" else {}),
        "bw": enc.qtype.bits,
        "is_sym": bool(enc.spec.symmetric),
        "scale": scale.reshape(-1).tolist(),
        "offset": np.atleast_1d(_unsigned_offset(enc)).reshape(-1).tolist(),
        **({"axis": int(enc.spec.axis)} if per_channel and enc.spec.axis is not None else {}),
    }


def _v1(acts: Mapping[str, Encoding], params: Mapping[str, Encoding]) -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "activation_encodings": [_entry_v1(n, e) for n, e in acts.items()],
        "param_encodings": [_entry_v1(n, e) for n, e in params.items()],
    }


def _entries_v061(enc: Encoding) -> list[dict[str, Any]]:
    if enc.spec.block_size:
        raise OnnxqError(
            "AIMET's 0.6.1 encodings cannot hold per-block (LPBQ) weights", "use --encodings-version 1.0.0"
        )
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


def read_split(path: Path) -> tuple[dict[str, Encoding], dict[str, Encoding]]:
    """(activation, param) encodings by tensor name, from an AIMET 0.6.1 or 1.0.0 file.

    AIMET does not store signedness; onnxq's symmetric tensors are signed, the others unsigned.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OnnxqError(
            f"cannot read encodings {path} ({type(exc).__name__})", "pass an AIMET encodings JSON"
        ) from None
    version = str(data.get("version", "")) if isinstance(data, dict) else ""
    if version.startswith("1."):
        parse = _read_v1
    elif version.startswith("0.6"):
        parse = _read_v061
    else:
        raise OnnxqError(f"{path} is not an AIMET encodings file (version {version!r})", "pass 0.6.1 or 1.0.0")
    sections = ("activation_encodings", "param_encodings")
    acts, params = (parse(data.get(section) or ({} if version.startswith("0.6") else [])) for section in sections)
    return acts, params


def read(path: Path) -> dict[str, Encoding]:
    """Tensor name -> encoding, activations and params together."""
    acts, params = read_split(path)
    return {**acts, **params}


def _make(bits: int, sym: bool, scale: np.ndarray, offset: np.ndarray, axis: int | None, block: int = 0) -> Encoding:
    zp = _from_unsigned(bits, sym, offset)
    spec = QuantSpec(_qtype(bits, sym), symmetric=sym, axis=axis, block_size=block)
    if axis is None:
        return Encoding(spec, scale.reshape(()), zp.reshape(()))
    return Encoding(spec, scale, zp)


def _read_v1(entries: list[dict[str, Any]]) -> dict[str, Encoding]:
    out = {}
    for e in entries:
        kind = e.get("enc_type", "PER_TENSOR")
        if kind == "LPBQ":
            out[e["name"]] = _read_lpbq(e)
            continue
        axis = int(e.get("axis", 1)) if kind in ("PER_CHANNEL", "PER_BLOCK") else None
        scale = np.asarray(e["scale"], dtype=np.float32)
        out[e["name"]] = _make(
            int(e["bw"]), bool(e["is_sym"]), scale, np.asarray(e["offset"]), axis, int(e.get("block_size", 0))
        )
    return out


def _read_lpbq(e: dict[str, Any]) -> Encoding:
    channel = np.asarray(e["scale"], dtype=np.float32)
    axis = int(e.get("axis", 0))
    ints = np.asarray(e["per_block_int_scale"]).reshape((-1, channel.size) if axis == 0 else (channel.size, -1))
    spec = QuantSpec(_qtype(int(e["compressed_bw"]), True), symmetric=True, axis=axis, block_size=int(e["block_size"]))
    return lpbq(spec, ints, channel)


def _read_v061(entries: dict[str, list[dict[str, Any]]]) -> dict[str, Encoding]:
    out = {}
    for name, channel in entries.items():
        sym = channel[0]["is_symmetric"] in (True, "True")
        scale = np.asarray([c["scale"] for c in channel], dtype=np.float32)
        offset = np.asarray([c["offset"] for c in channel])
        out[name] = _make(int(channel[0]["bitwidth"]), sym, scale, offset, 1 if len(channel) > 1 else None)
    return out
