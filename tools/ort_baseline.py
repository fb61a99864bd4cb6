"""ONNX Runtime's own static QDQ quantizer for the QNN EP, run as a user would run it.

``get_qnn_qdq_config`` + ``quantize`` with MinMax calibration on the same calibration windows
onnxq uses. Two set-ups: the graph as exported (``--per-channel`` off), and the strongest a user
can set up (``--canonical``): onnxq's canonical graph (fused RMSNorm, finite mask, untied embedding)
with every MatMul weight per output channel and symmetric, which ``per_channel=True`` alone does not
give (it writes per-tensor overrides for MatMul weights), and the lm_head at 8 bits as onnxq keeps it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.stages.metrics import peak_rss_mb

TYPES = {
    "w8a16": ("QUInt16", "QUInt8"),
    "w8a8": ("QUInt8", "QUInt8"),
    "w4a16": ("QUInt16", "QInt4"),
    "w4a8": ("QUInt8", "QInt4"),
}


def canonical_graph(model: Path, output: Path) -> Path:
    """onnxq's canonical float graph of ``model`` (no rotation), written next to ``output``."""
    import onnx_ir as ir

    from onnxq.core import recipes
    from onnxq.core.ir import save
    from rewrites import canonical
    from rewrites.base import apply

    graph = ir.load(model)
    seq_len = graph.graph.inputs[0].shape[1]
    mask = recipes.for_model_type(graph.metadata_props.get("onnxq.model_type")).mask_value
    steps = [
        lambda m: canonical.specialize_inputs(m, seq_len),
        canonical.fold_constants,
        lambda m: canonical.finite_mask(m, mask),
        canonical.untie_weights,
        canonical.fuse_rms_norm,
    ]
    graph, _ = apply(graph, steps)
    path = output.with_name("canonical.onnx")
    save(graph, path)
    return path


def lm_head_weight(model: Path) -> str:
    """The weight of the MatMul that writes the logits (kept at 8 bits with 4-bit presets, as onnxq keeps it)."""
    import onnx

    proto = onnx.load(model, load_external_data=False)
    logits = proto.graph.output[0].name
    return next(n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and logits in n.output)


def per_channel_overrides(model: Path, weight_type: Any) -> dict[str, list[dict[str, Any]]]:
    """Symmetric per-output-channel quantization of every constant MatMul weight ([in, out]: axis 1);
    the lm_head's at 8 bits."""
    import onnx
    from onnxruntime.quantization import QuantType

    proto = onnx.load(model, load_external_data=False)
    consts = {i.name for i in proto.graph.initializer}
    head = lm_head_weight(model)
    return {
        n.input[1]: [
            {"quant_type": QuantType.QInt8 if n.input[1] == head else weight_type, "axis": 1, "symmetric": True}
        ]
        for n in proto.graph.node
        if n.op_type == "MatMul" and n.input[1] in consts
    }


def quantize_with_ort(
    model: Path, output: Path, windows: np.ndarray, preset: str, per_channel: bool = False, canonical: bool = False
) -> dict:
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
    output.parent.mkdir(parents=True, exist_ok=True)
    if canonical:
        model = canonical_graph(model, output)
    config = get_qnn_qdq_config(
        str(model),
        Reader(),
        activation_type=getattr(QuantType, act),
        weight_type=getattr(QuantType, weight),
        per_channel=per_channel or canonical,
        init_overrides=per_channel_overrides(model, getattr(QuantType, weight)) if canonical else None,
    )
    quantize(str(model), str(output), config)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--preset", default="w8a16", choices=sorted(TYPES))
    parser.add_argument("--windows", required=True, help=".npy file of calibration token windows")
    parser.add_argument("--per-channel", action="store_true")
    parser.add_argument("--canonical", action="store_true", help="onnxq's canonical graph, per-channel weights")
    args = parser.parse_args()
    info = quantize_with_ort(
        Path(args.model), Path(args.output), np.load(args.windows), args.preset, args.per_channel, args.canonical
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
