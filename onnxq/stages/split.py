"""A QDQ model as a float model plus encodings, and back: what Qualcomm's converter consumes.

``qnn-onnx-converter --quantization_overrides`` takes a float ONNX model and an encodings file
naming its tensors. :func:`split` derives both from any QDQ model (onnxq's or another tool's):

- a weight or constant behind a ``DequantizeLinear`` becomes the float initializer holding exactly
  its dequantized values (so re-quantizing it gives the same integers), its encoding a *param*;
- an activation ``X → Q → DQ`` loses the pair, its encoding an *activation* entry under ``X``'s name
  (a graph output keeps its name);
- a second ``Q → DQ`` on one edge (a convert between two widths) becomes an ``Identity`` whose output
  carries the second encoding, so the float graph still names every encoded value.

:func:`join` inserts the pairs again; ``join(*split(m))`` computes what ``m`` computes, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import take_over, unique_name
from onnxq.core.qtypes import Encoding, QType, QuantSpec, lpbq

_QTYPES = {q.onnx: q for q in QType}


@dataclass
class Split:
    """The float model and the encodings of its tensors (activations and params, by tensor name)."""

    model: ir.Model
    activations: dict[str, Encoding]
    params: dict[str, Encoding]


def _lpbq_scale(node: ir.Node) -> ir.Node | None:
    """The ``DequantizeLinear`` computing ``node``'s block scales (LPBQ weights), if there is one."""
    scale_v = node.inputs[1]
    producer = scale_v.producer() if scale_v is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _encoding(node: ir.Node) -> Encoding:
    """The encoding a Q or DQ node applies (scale, zero point and axis from its inputs/attributes)."""
    scale_dq = _lpbq_scale(node)
    if scale_dq is not None:
        ints_v, channel_v = scale_dq.inputs[0], scale_dq.inputs[1]
        zp_v = node.inputs[2] if len(node.inputs) > 2 else None
        if ints_v is None or ints_v.const_value is None or channel_v is None or channel_v.const_value is None:
            raise OnnxqError(f"{node.name!r} has computed block scales", "only LPBQ's constant block scales are read")
        qtype = _QTYPES.get(zp_v.const_value.dtype) if zp_v is not None and zp_v.const_value is not None else None
        if qtype is None:
            raise OnnxqError(f"{node.name!r} has no integer zero point", "write the zero point of blocked weights")
        spec = QuantSpec(qtype, True, node.attributes.get_int("axis", 1), node.attributes.get_int("block_size", 0))
        return lpbq(spec, np.asarray(ints_v.const_value.numpy()), np.asarray(channel_v.const_value.numpy()))
    scale_v, zp_v = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if scale_v is None or scale_v.const_value is None or zp_v is None or zp_v.const_value is None:
        raise OnnxqError(
            f"{node.op_type} {node.name!r} has no constant scale and zero point",
            "only static QDQ models (fixed scales) can be split into float + encodings",
        )
    zp_t = zp_v.const_value
    qtype = _QTYPES.get(zp_t.dtype)
    if qtype is None:
        raise OnnxqError(f"{node.name!r} quantizes to {zp_t.dtype}", "use 4, 8 or 16-bit integer types")
    scale = np.asarray(scale_v.const_value.numpy(), dtype=np.float32)
    zp = np.asarray(zp_t.numpy()).astype(np.int64)
    axis = node.attributes.get_int("axis", 1) if scale.ndim > 0 and scale.size > 1 else None
    block = node.attributes.get_int("block_size", 0)
    symmetric = qtype.signed and not np.any(zp)
    return Encoding(QuantSpec(qtype, symmetric, axis, block), scale, zp)


def split(model: ir.Model, *, weights: bool = True) -> Split:
    """Take the Q/DQ nodes out of ``model`` (in place); returns it with the encodings they held.

    ``weights=False`` skips dequantizing the weights (the encodings alone, without the float copy
    of every weight; the model is then not runnable).
    """
    graph = model.graph
    acts: dict[str, Encoding] = {}
    params: dict[str, Encoding] = {}
    qparams: set[str] = set()
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {o.name for n in graph for o in n.outputs}
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        if any(u.node.op_type == "DequantizeLinear" and u.idx == 1 for u in node.outputs[0].uses()):
            continue  # LPBQ block scales: read with the weight they scale
        source = node.inputs[0]
        enc = _encoding(node)
        scale_dq = _lpbq_scale(node)
        qparams.update(v.name for v in node.inputs[1:] if v is not None)
        if scale_dq is not None:
            qparams.update(v.name for v in scale_dq.inputs if v is not None)
        if source.const_value is not None:  # weight / constant
            base = source.name.removesuffix(".q")  # the float name, free again in a graph onnxq wrote
            name = base if base not in taken else unique_name(graph, base)
            taken.add(name)
            q_values = np.asarray(source.const_value.numpy()) if weights else np.zeros((), np.int8)
            array = enc.dequantize(q_values) if weights else np.zeros((), np.float32)
            init = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
            init.const_value = ir.tensor(array, name=name)
            graph.register_initializer(init)
            take_over(graph, node.outputs[0], init, suffix=".dq")
            graph.remove(node, safe=True)
            if scale_dq is not None:
                graph.remove(scale_dq, safe=True)
            if not source.uses() and source.name in graph.initializers:
                graph.initializers.pop(source.name)
            params[init.name] = enc
            continue
        q = source.producer()
        if q is None or q.op_type != "QuantizeLinear":
            raise OnnxqError(f"DequantizeLinear {node.name!r} reads no QuantizeLinear", "pass a QDQ model")
        x = q.inputs[0]
        assert x is not None
        converted = x.producer() is not None and x.producer().op_type == "DequantizeLinear"  # type: ignore[union-attr]
        if converted or x.name in acts:  # a convert (or a 2nd encoding): name the value with an Identity
            ident_out = ir.Value(name=unique_name(graph, f"{x.name}.cvt"), type=x.type, shape=x.shape)
            ident = ir.node("Identity", [x], outputs=[ident_out], name=unique_name(graph, f"{x.name}/Cvt"))
            graph.insert_after(q, ident)
            target = ident_out
        else:
            target = x
        take_over(graph, node.outputs[0], target, suffix=".dq")
        acts[target.name] = enc
        graph.remove(node, safe=True)
        if not q.outputs[0].uses():
            graph.remove(q, safe=True)
    for name in qparams:
        value = graph.initializers.get(name)
        if value is not None and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
    return Split(model, acts, params)


def join(model: ir.Model, activations: Mapping[str, Encoding], params: Mapping[str, Encoding]) -> ir.Model:
    """Insert ``Q → DQ`` for every encoded tensor of a float ``model`` (in place) and return it.

    An encoded ``Identity`` output is a convert: its ``Q → DQ`` reads the Identity's input directly
    and the Identity goes, as in the QDQ model :func:`split` took apart.
    """
    from onnxq.stages.qdq import _insert_qdq, _params, _quantize_const  # the one place that writes QDQ nodes

    graph = model.graph
    values = {v.name: v for v in graph.inputs}
    values.update({o.name: o for n in graph for o in n.outputs})
    missing = [n for n in (*activations, *params) if n not in values and n not in graph.initializers]
    if missing:
        raise OnnxqError(
            f"the encodings name {len(missing)} tensors the model lacks (e.g. {missing[0]!r})",
            "pass the float model the encodings were written for",
        )
    for name, enc in params.items():
        scale, zp = _params(graph, name, enc)
        _quantize_const(graph, name, enc, scale, zp)

    def is_convert(name: str) -> bool:
        producer = values[name].producer()
        return producer is not None and producer.op_type == "Identity"

    for name in sorted(activations, key=is_convert):  # sources before their converts
        enc = activations[name]
        value = values[name]
        producer = value.producer()
        scale, zp = _params(graph, name, enc)
        _insert_qdq(graph, value, scale, zp, enc, producer)
        if producer is not None and producer.op_type == "Identity":
            q = next(u.node for u in value.uses() if u.node.op_type == "QuantizeLinear")
            q.replace_input_with(0, producer.inputs[0])
            graph.remove(producer, safe=True)
    return model
