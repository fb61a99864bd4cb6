"""ONNX Runtime's own static QDQ quantizer for the QNN EP, run as a user would run it.

``get_qnn_qdq_config`` + ``quantize`` with MinMax calibration on the same calibration windows
onnxq uses. This is the baseline every benchmark row is compared against.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnxq.metrics import peak_rss_mb

TYPES = {
    "w8a16": ("QUInt16", "QUInt8"),
    "w8a8": ("QUInt8", "QUInt8"),
    "w4a16": ("QUInt16", "QInt4"),
    "w4a8": ("QUInt8", "QInt4"),
}


def quantize_with_ort(model: Path, output: Path, windows: np.ndarray, preset: str, per_channel: bool = False) -> dict:
    """Quantize ``model`` with ORT's QNN configuration; returns timing and memory."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input_ids": w.reshape(1, -1).astype(np.int64)} for w in windows])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    act, weight = TYPES[preset]
    start = time.perf_counter()
    config = get_qnn_qdq_config(
        str(model),
        Reader(),
        activation_type=getattr(QuantType, act),
        weight_type=getattr(QuantType, weight),
        per_channel=per_channel,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    quantize(str(model), str(output), config)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--preset", default="w8a16", choices=sorted(TYPES))
    parser.add_argument("--windows", required=True, help=".npy file of calibration token windows")
    parser.add_argument("--per-channel", action="store_true")
    args = parser.parse_args()
    info = quantize_with_ort(Path(args.model), Path(args.output), np.load(args.windows), args.preset, args.per_channel)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
