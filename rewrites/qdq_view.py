"""A float view of a QDQ graph: every Q→DQ pair bypassed, every quantized constant dequantized.

Structure discovery and the float reference run on this view; tensor names stay those of the QDQ
graph's producers, so a value in the view can be found again in the QDQ graph (after its Q/DQ).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxq.core.ir import const_array
from rewrites.base import RewriteResult


def _dequantizer(node: ir.Node) -> tuple[Callable[[], ir.TensorProtocol], ir.Shape] | None:
    """What dequantizes ``node``'s constant input, called when its values are read, and their shape:
    a view of a large model holds its float weights only while one is read."""
    codes = ir.convenience.get_const_tensor(node.inputs[0]) if node.inputs[0] is not None else None
    scale = const_array(node.inputs[1])
    if codes is None or scale is None:
        return None
    zp = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    axis_attr = node.attributes.get("axis")
    block_attr = node.attributes.get("block_size")
    axis = int(axis_attr.value) if axis_attr is not None else 1
    block = int(block_attr.value) if block_attr is not None else 0

    def values() -> ir.TensorProtocol:
        qf = codes.numpy().astype(np.float64)
        s = scale.astype(np.float64)
        z = zp.astype(np.float64) if zp is not None else np.zeros_like(s)
        if s.ndim and s.size > 1:
            at = axis % qf.ndim
            if block:
                s, z = np.repeat(s, block, axis=at), np.repeat(z, block, axis=at)
            else:
                shape = [1] * qf.ndim
                shape[at] = -1
                s, z = s.reshape(shape), z.reshape(shape)
        return ir.tensor(((qf - z) * s).astype(np.float32))

    return values, ir.Shape(codes.shape)


def strip_qdq(model: ir.Model) -> RewriteResult:
    """Bypass Q/DQ pairs and dequantize constant weights, in place."""
    graph = model.graph
    pairs = consts = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.graph is None:
            continue
        src = node.inputs[0]
        producer = src.producer() if src is not None else None
        out = node.outputs[0]
        if producer is not None and producer.op_type == "QuantizeLinear":
            original = producer.inputs[0]
            assert original is not None
            was_output, name = out.is_graph_output(), out.name
            out.replace_all_uses_with(original, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            if was_output and not original.is_graph_input():
                original.name = name  # the graph output keeps its name (logits, not logits.float)
            if not producer.outputs[0].uses():
                graph.remove(producer, safe=True)
            pairs += 1
        elif src is not None and src.is_initializer():
            found = _dequantizer(node)
            if found is None:
                continue
            values, shape = found
            name = src.name.removesuffix(".q")
            fresh = ir.Value(
                name=name if name not in graph.initializers else f"{name}.float",
                shape=shape,
                type=ir.TensorType(ir.DataType.FLOAT),
                const_value=ir.LazyTensor(values, dtype=ir.DataType.FLOAT, shape=shape),
            )
            fresh.const_value.name = fresh.name
            graph.register_initializer(fresh)
            out.replace_all_uses_with(fresh, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            consts += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return RewriteResult(model, "strip Q/DQ", {"pairs bypassed": pairs, "constants dequantized": consts})
