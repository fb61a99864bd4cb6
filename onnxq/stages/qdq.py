"""Emit the QDQ model: every planned point becomes QuantizeLinear/DequantizeLinear with fixed scales.

Activations get ``Q → DQ`` right after their producer, every consumer reading the dequantized
value; constants and weights become integer initializers behind a ``DequantizeLinear``; planned
converts add a second ``Q → DQ`` (another width) on one edge, which the QNN EP turns into a
Convert. One pass, driven only by the plan and the encodings, so that a float model plus an
encodings file rebuild exactly the same QDQ model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxq.core.ir import add_initializer, const_array, take_over, unique_name
from onnxq.core.qtypes import Encoding
from onnxq.plan import Point, QuantPlan

log = logging.getLogger(__name__)


def _params(graph: ir.Graph, name: str, enc: Encoding) -> tuple[ir.Value, ir.Value]:
    scale = add_initializer(graph, f"{name}.scale", np.asarray(enc.scale, dtype=np.float32))
    zp = add_initializer(graph, f"{name}.zero_point", np.asarray(enc.zero_point).astype(enc.qtype.numpy))
    return scale, zp


def _axis_attrs(enc: Encoding) -> dict[str, int]:
    attrs: dict[str, int] = {}
    if enc.spec.axis is not None and np.asarray(enc.scale).ndim > 0:
        attrs["axis"] = int(enc.spec.axis)
        if enc.spec.block_size:
            attrs["block_size"] = int(enc.spec.block_size)
    return attrs


def _insert_qdq(
    graph: ir.Graph, value: ir.Value, scale: ir.Value, zp: ir.Value, enc: Encoding, after: ir.Node | None, tag: str = ""
) -> ir.Value:
    """``value → Q → DQ``; every other reader of ``value`` now reads the DQ output."""
    base = value.name
    q_out = ir.Value(name=unique_name(graph, f"{base}{tag}.q"), type=ir.TensorType(enc.qtype.onnx), shape=value.shape)
    dq_out = ir.Value(
        name=unique_name(graph, f"{base}{tag}.dq"), type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape
    )
    q = ir.node(
        "QuantizeLinear",
        [value, scale, zp],
        _axis_attrs(enc),
        outputs=[q_out],
        name=unique_name(graph, f"{base}{tag}/Q"),
    )
    dq = ir.node(
        "DequantizeLinear",
        [q_out, scale, zp],
        _axis_attrs(enc),
        outputs=[dq_out],
        name=unique_name(graph, f"{base}{tag}/DQ"),
    )
    take_over(graph, value, dq_out, suffix=".float", keep=q)
    if after is None:
        graph.insert_before(next(iter(graph)), [q, dq])
    else:
        graph.insert_after(after, [q, dq])
    return dq_out


def _lpbq_scale(graph: ir.Graph, name: str, enc: Encoding) -> tuple[ir.Node, ir.Value]:
    """The LPBQ block scales as ``DequantizeLinear(uint8 block integers, per-channel float scale)``,
    the form the QNN EP fuses into one per-channel FullyConnected with LPBQ encodings."""
    assert enc.channel_scale is not None
    ints = add_initializer(graph, f"{name}.block_ints", enc.block_ints)
    channel = add_initializer(graph, f"{name}.channel_scale", np.asarray(enc.channel_scale, dtype=np.float32))
    zero = add_initializer(graph, f"{name}.channel_zero_point", np.zeros(enc.channel_scale.shape, np.uint8))
    out = ir.Value(
        name=unique_name(graph, f"{name}.scale"),
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(np.asarray(enc.scale).shape),
    )
    node = ir.node(
        "DequantizeLinear",
        [ints, channel, zero],
        {"axis": enc.spec.channel_axis},
        outputs=[out],
        name=unique_name(graph, f"{name}/ScaleDQ"),
    )
    return node, out


def _quantize_const(graph: ir.Graph, name: str, enc: Encoding, scale: ir.Value, zp: ir.Value) -> None:
    """Replace a float initializer by integers behind a DequantizeLinear."""
    value = graph.initializers[name]
    arr = const_array(value)
    assert arr is not None
    q = enc.quantize(arr).astype(enc.qtype.numpy)
    q_init = add_initializer(graph, f"{name}.q", q)
    dq_out = ir.Value(
        name=unique_name(graph, f"{name}.dq"), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(arr.shape)
    )
    nodes: list[ir.Node] = []
    unused_scale = scale
    if enc.channel_scale is not None:
        scale_node, scale = _lpbq_scale(graph, name, enc)
        nodes.append(scale_node)
    nodes.append(
        ir.node(
            "DequantizeLinear",
            [q_init, scale, zp],
            _axis_attrs(enc),
            outputs=[dq_out],
            name=unique_name(graph, f"{name}/DQ"),
        )
    )
    users = [(u.node, u.idx) for u in value.uses()]
    first = min((list(graph).index(n) for n, _ in users), default=0)
    graph.insert_before(list(graph)[first], nodes)
    if enc.channel_scale is not None and not unused_scale.uses():  # the float block scales: now computed
        graph.initializers.pop(unused_scale.name)
    for node, idx in users:
        node.replace_input_with(idx, dq_out)
    graph.initializers.pop(name)
    value.const_value = None  # the float weight goes now, not at the next cycle collection


def emit_qdq(model: ir.Model, plan: QuantPlan, encodings: Mapping[str, Encoding]) -> ir.Model:
    """Insert the plan's quantizers into ``model`` (in place) and return it."""
    graph = model.graph
    producers = {o.name: n for n in graph for o in n.outputs}
    values = {v.name: v for v in graph.inputs}
    values.update({o.name: o for n in graph for o in n.outputs})
    params: dict[str, tuple[ir.Value, ir.Value]] = {}

    def params_of(name: str) -> tuple[ir.Value, ir.Value]:
        if name not in params:
            params[name] = _params(graph, name, encodings[name])
        return params[name]

    dq_of: dict[str, ir.Value] = {}
    for point in plan.points.values():
        if point.kind == "convert":
            continue
        enc = encodings[point.name]
        scale, zp = params_of(point.name)
        for tensor in point.tensors:
            dq_of[tensor] = _insert_qdq(graph, values[tensor], scale, zp, enc, producers.get(tensor))
        for const in point.consts:
            _quantize_const(graph, const, enc, scale, zp)
    nodes = {n.name: n for n in graph}
    made: dict[tuple[str, str], ir.Value] = {}  # (point, tensor) -> converted value, shared by readers
    for conv in plan.converts:
        consumer = nodes[conv.consumer]
        key = (conv.point, conv.tensor)
        if key not in made:
            source = consumer.inputs[conv.index]
            assert source is not None
            enc = encodings[conv.point]
            if conv.spec is None:
                scale, zp = params_of(conv.point)
            else:  # the point's range in another type (an exact widening keeps every code)
                enc = enc.with_spec(conv.spec)
                scale, zp = _params(graph, f"{conv.tensor}.cvt", enc)
            q_out = ir.Value(
                name=unique_name(graph, f"{conv.tensor}.cvt.q"), type=ir.TensorType(enc.qtype.onnx), shape=source.shape
            )
            dq_out = ir.Value(
                name=unique_name(graph, f"{conv.tensor}.cvt.dq"),
                type=ir.TensorType(ir.DataType.FLOAT),
                shape=source.shape,
            )
            q = ir.node(
                "QuantizeLinear", [source, scale, zp], outputs=[q_out], name=unique_name(graph, f"{conv.tensor}/CvtQ")
            )
            dq = ir.node(
                "DequantizeLinear",
                [q_out, scale, zp],
                outputs=[dq_out],
                name=unique_name(graph, f"{conv.tensor}/CvtDQ"),
            )
            producer = source.producer()
            if producer is not None:
                graph.insert_after(producer, [q, dq])
            else:
                graph.insert_before(consumer, [q, dq])
            made[key] = dq_out
        consumer.replace_input_with(conv.index, made[key])
    model.metadata_props["onnxq.preset"] = plan.preset.name
    return model


def point_summary(point: Point, enc: Encoding) -> str:
    """One readable line for logs and reports."""
    if point.kind == "weight" and enc.spec.block_size:
        return f"{point.name}: {enc.qtype.value} per-block {enc.spec.block_size} (LPBQ)"
    if point.kind == "weight":
        return f"{point.name}: {enc.qtype.value} per-channel"
    lo, hi = enc.range()
    return f"{point.name}: {enc.qtype.value} [{lo:.4g}, {hi:.4g}]"
