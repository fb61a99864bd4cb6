"""Positions and the attention mask as inputs, so several short sequences share one static window.

A static scoring graph folds the causal mask (``[.., R, S]``, R a multiple of S after the GQA rewrite)
and the RoPE cos/sin tables (``[.., R, D]``) into constants: every window holds one sequence starting
at position 0. Zero-shot tasks score thousands of 30-150-token requests; run one per 512-token
window and most of the compute is padding. :func:`expose_positions` turns those constants into
functions of two new inputs, ``position_ids [1, S]`` (int64) and ``attend [1, 1, S, S]`` (bool,
query row x key column), so a caller can pack requests side by side, each with its own positions
and a block mask: the tables become a Gather of their rows, the mask a Where between its own
"allowed" and "masked" values. Quantized constants are handled on their dequantized side, which
keeps the arithmetic of every other node as it was; the result is an evaluation graph for ONNX
Runtime CPU, not one to deploy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import add_initializer, const_array, take_over, unique_name
from rewrites.base import RewriteResult

#: names of the new inputs (a suffix is added if the graph already uses one); they are appended to
#: the graph inputs in this order, after input_ids
POSITIONS = "position_ids"
ATTEND = "attend"


@dataclass(frozen=True)
class _View:
    """A constant as the graph's float arithmetic sees it: the value read and its float array."""

    value: ir.Value
    array: np.ndarray


def _float_views(init: ir.Value) -> list[_View]:
    """The float side of a constant: itself, or the outputs of the DequantizeLinear nodes reading it."""
    array = const_array(init)
    if array is None:
        return []
    readers = [u.node for u in init.uses()]
    if readers and all(n.op_type == "DequantizeLinear" and n.inputs[0] is init for n in readers):
        views = []
        for node in readers:
            scale, zero = const_array(node.inputs[1]), const_array(node.inputs[2]) if len(node.inputs) > 2 else None
            if scale is None or scale.size != 1:
                return []
            zp = 0 if zero is None else zero.astype(np.float64).reshape(())
            real = (array.astype(np.float64) - zp) * scale.reshape(())
            views.append(_View(node.outputs[0], real.astype(np.float32)))
        return views
    if array.dtype != np.float32:
        return []
    return [_View(init, array)]


def _is_mask(view: _View, seq_len: int) -> bool:
    arr = view.array
    if arr.ndim < 2 or arr.shape[-1] != seq_len or arr.shape[-2] % seq_len or not arr.size:
        return False
    if not any(u.node.op_type == "Add" for u in view.value.uses()):
        return False
    rows = arr.reshape(-1, arr.shape[-2], seq_len)
    allowed, masked = rows[0, 0, 0], rows[0, 0, 1] if seq_len > 1 else rows[0, 0, 0] - 1
    if not masked < allowed:
        return False
    causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))
    expect = np.where(np.tile(causal, (arr.shape[-2] // seq_len, 1)), allowed, masked)
    return bool(all(np.array_equal(r, expect) for r in rows))


def _is_table(view: _View, seq_len: int) -> bool:
    arr = view.array
    if arr.ndim < 2 or arr.shape[-2] % seq_len or arr.shape[-2] == 0 or int(np.prod(arr.shape[:-2])) != 1:
        return False
    if not view.value.uses() or not all(u.node.op_type == "Mul" for u in view.value.uses()):
        return False
    rows = arr.reshape(arr.shape[-2], arr.shape[-1])
    first = rows[0]
    cos_or_sin = np.allclose(first, 1.0, atol=1e-2) or np.allclose(first, 0.0, atol=1e-2)
    periodic = all(np.array_equal(rows[:seq_len], rows[k : k + seq_len]) for k in range(seq_len, len(rows), seq_len))
    return bool(cos_or_sin and periodic and not np.allclose(rows[1], first))


def _positional(init: ir.Value, seq_len: int) -> bool:
    """A constant shaped like a mask or a per-position table (its last two dims S x S, or rows a
    multiple of S) read by something other than a MatMul/Gemm (a weight may have S rows)."""
    shape = init.shape
    if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape):
        return False
    rows = int(shape[-2])
    if rows < seq_len or rows % seq_len:
        return False
    readers: set[str] = set()
    todo = [init]
    while todo:  # through Q/DQ, Transpose and Cast to what reads the values
        for use in todo.pop().uses():
            node = use.node
            if node.op_type in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Cast") and use.idx == 0:
                todo.append(node.outputs[0])
            else:
                readers.add(node.op_type)
    return not readers <= {"MatMul", "Gemm", "Gather"}


def expose_positions(model: ir.Model) -> RewriteResult:
    """Feed the RoPE tables' rows and the additive mask from ``position_ids`` and ``attend`` inputs."""
    graph = model.graph
    ids = [v for v in graph.inputs if v.shape is not None and len(v.shape) == 2]
    if len(graph.inputs) != 1 or not ids or not isinstance(ids[0].shape[1], int):
        raise OnnxqError("packing needs a scoring graph with one static input_ids [1, S]", "use `onnxq export`")
    seq_len = int(ids[0].shape[1])
    if seq_len < 2:
        return RewriteResult(model, "expose positions", {"masks": 0, "tables": 0})
    views = [v for init in list(graph.initializers.values()) for v in _float_views(init)]
    masks = [v for v in views if _is_mask(v, seq_len)]
    tables = [v for v in views if _is_table(v, seq_len)]
    known = {id(v.value) for v in masks + tables}
    known |= {id(n.inputs[0]) for v in masks + tables if (n := v.value.producer()) is not None}
    unknown = [
        init.name for init in graph.initializers.values() if id(init) not in known and _positional(init, seq_len)
    ]
    if not masks or not tables or unknown:  # a constant left tied to positions 0..S-1 would give wrong scores
        return RewriteResult(model, "expose positions", {"masks": 0, "tables": 0}, tuple(unknown[:3]))

    first = next(iter(graph))
    positions = ir.Value(
        name=unique_name(graph, POSITIONS), shape=ir.Shape([1, seq_len]), type=ir.TensorType(ir.DataType.INT64)
    )
    attend = ir.Value(
        name=unique_name(graph, ATTEND), shape=ir.Shape([1, 1, seq_len, seq_len]), type=ir.TensorType(ir.DataType.BOOL)
    )
    graph.inputs.extend([positions, attend])
    tiled: dict[int, ir.Value] = {}
    rows_of: dict[int, ir.Value] = {}
    for view in tables:
        rows = view.array.shape[-2]
        if rows not in rows_of:
            offsets = np.repeat(np.arange(rows // seq_len, dtype=np.int64) * seq_len, seq_len)
            flat = ir.node("Reshape", [positions, add_initializer(graph, "positions/shape", np.array([-1]))])
            repeats = add_initializer(graph, "positions/reps", np.array([rows // seq_len]))
            reps = ir.node("Tile", [flat.outputs[0], repeats])
            index = ir.node("Add", [reps.outputs[0], add_initializer(graph, "positions/offsets", offsets)])
            for node in (flat, reps, index):
                node.name = unique_name(graph, f"positions/{node.op_type.lower()}")
                graph.insert_before(first, node)
            rows_of[rows] = index.outputs[0]
        gather = ir.node("Gather", [view.value, rows_of[rows]], {"axis": view.array.ndim - 2})
        gather.name = unique_name(graph, f"{view.value.name}/rows")
        take_over(graph, view.value, gather.outputs[0], suffix="/table", keep=gather)
        _insert_after_source(graph, view.value, gather, first)
    for view in masks:
        group = view.array.shape[-2] // seq_len
        if group not in tiled:
            tile = ir.node("Concat", [attend] * group, {"axis": 2}) if group > 1 else None
            if tile is not None:
                tile.name = unique_name(graph, "attend/tile")
                graph.insert_before(first, tile)
            tiled[group] = attend if tile is None else tile.outputs[0]
        flat = view.array.reshape(-1)
        allowed = add_initializer(graph, f"{view.value.name}/allowed", np.asarray(flat[0], dtype=np.float32))
        masked = add_initializer(graph, f"{view.value.name}/masked", np.asarray(flat[1], dtype=np.float32))
        where = ir.node("Where", [tiled[group], allowed, masked])
        where.name = unique_name(graph, f"{view.value.name}/attend")
        take_over(graph, view.value, where.outputs[0], suffix="/mask", keep=where)
        graph.insert_before(first, where)
    for view in masks:  # the folded mask (and its DequantizeLinear) is no longer read
        node = view.value.producer()
        if node is not None and not view.value.uses():
            view_init = node.inputs[0]
            params = [v for v in node.inputs[1:] if v is not None]
            graph.remove(node, safe=True)
            for v in params:
                if v.is_initializer() and not v.uses():
                    graph.initializers.pop(v.name or "")
        else:
            view_init = view.value
        if view_init is not None and view_init.is_initializer() and not view_init.uses():
            graph.initializers.pop(view_init.name or "")
    return RewriteResult(model, "expose positions", {"masks": len(masks), "tables": len(tables)})


def _insert_after_source(graph: ir.Graph, value: ir.Value, node: ir.Node, first: ir.Node) -> None:
    producer = value.producer()
    if producer is None:
        graph.insert_before(first, node)
    else:
        graph.insert_after(producer, node)
