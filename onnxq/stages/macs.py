"""Where a QDQ model's MatMul work runs, by the widths of its two operands.

The HTP's fastest path is an 8-bit activation times an 8- or 4-bit weight; a 16-bit activation
costs more, two activations (QKᵀ, probabilities x V) more still. A precision map decides how much
of the work lands where, so :func:`mac_widths` reports it: the share of MatMul multiply-adds for
each pair of operand widths, read from the Q/DQ pairs in front of each MatMul.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, shape_inference

_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT16: 16,
    TensorProto.UINT16: 16,
}


def mac_widths(model: onnx.ModelProto) -> dict[str, float]:
    """Share (in %) of MatMul multiply-adds per operand pair, e.g. ``{"a8 x w4": 65.2, ...}``.

    ``aN`` is an N-bit activation, ``wN`` an N-bit constant (weight or Hadamard matrix), ``float``
    an operand without a DequantizeLinear in front. Shapes come from ONNX shape inference, so the
    model needs static shapes (as everything onnxq quantizes has).
    """
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    consts = {t.name: t for t in graph.initializer}
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    producer = {out: node for node in graph.node for out in node.output}

    def width(name: str) -> str:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return "float"
        source = dq.input[0]
        if source in consts:
            return f"w{_BITS.get(consts[source].data_type, '?')}"
        q = producer.get(source)
        zero = q.input[2] if q is not None and len(q.input) > 2 else ""
        return f"a{_BITS.get(consts[zero].data_type, '?')}" if zero in consts else "a?"

    work: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if not a or not b or min(a) < 0 or min(b) < 0:
            raise ValueError(f"MatMul {node.name!r} has no static input shapes")
        work[f"{width(node.input[0])} x {width(node.input[1])}"] += int(np.prod(a, dtype=np.int64)) * b[-1]
    total = sum(work.values())
    return {k: round(100.0 * v / total, 2) for k, v in work.most_common()} if total else {}
