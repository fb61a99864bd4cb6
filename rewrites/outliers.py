"""Split a few outlier channels off the MLP's intermediate, so 8-bit ranges are set by ordinary values.

In Llama-family models a handful of intermediate channels carry "massive activations"
(SmolLM2-135M, layer 11: 3069 and 1093 in two of 1536 down_proj input channels at the first token,
against at most ~16 anywhere else). They are born in gate_proj and up_proj outputs and multiplied
together. A rotation cannot help: the token's whole norm is large. One static 8-bit scale on the
gate, up or down_proj input must then either clip them (the attention sink is lost and every later
layer drifts) or spend its 256 steps on them (every other value rounds to zero).

The split, for a set C of intermediate channels (``h``: the MLP norm's output)::

    main: gate_proj, up_proj with columns C zeroed, down_proj with rows C zeroed  -> 8-bit as before
    side: act(h W_gate[:, C]) * (h W_up[:, C]), then @ W_down[C]                   -> 16-bit, k wide
    y   = main + side

exact in float (the main path's channels C are act(0)·0 = 0). The side path is three rank-k
MatMuls at 16 bits (k ≤ a few per layer): LLM.int8()'s decomposition with the channels fixed
offline, as a static NPU graph needs. The new nodes carry :data:`rewrites.structure.SPLIT_KEY`
("side" or "sum") so structure discovery and the planner can tell them apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import add_initializer, const_array, is_const, unique_name
from rewrites.base import RewriteResult
from rewrites.structure import SPLIT_KEY, Structure, as_linear

#: the fewest channels a side path takes: a one-channel side path is a 1-wide FC, and the HTP's
#: compile of a one-token graph holding one runs away with memory (over 24 GB on SmolLM2's decode)
MIN_SIDE_WIDTH = 2


def choose_channels(peaks: np.ndarray, ratio: float, limit: int) -> list[int]:
    """Channels whose peak |x| exceeds ``ratio`` × the median channel's peak, at most
    ``max(limit, MIN_SIDE_WIDTH)``, and none or at least :data:`MIN_SIDE_WIDTH` (a lone channel takes
    the next largest along).

    The median channel peak is what an ordinary channel reaches; a channel ``ratio`` times above it
    would take that share of an 8-bit range on its own.
    """
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(peaks)):
        raise OnnxqError("channel peaks of a down_proj input are not finite", "check the float model (onnxq eval)")
    typical = float(np.median(peaks))
    order = np.argsort(-peaks, kind="stable")[: max(limit, MIN_SIDE_WIDTH)]
    over = int((peaks[order] > ratio * typical).sum()) if typical > 0 else 0  # a prefix: peaks descend
    return sorted(int(c) for c in order[: max(over, MIN_SIDE_WIDTH)]) if over else []


def _value(graph: ir.Graph, like: ir.Value, suffix: str, width: int | None = None) -> ir.Value:
    shape = like.shape
    if width is not None and shape is not None:
        shape = ir.Shape([*list(shape)[:-1], width])
    return ir.Value(name=unique_name(graph, f"{like.name}.{suffix}"), type=like.type, shape=shape)


def _node(graph: ir.Graph, prefix: str, op: str, inputs: list, outputs: list, part: str, attrs: dict) -> ir.Node:
    """A node of the split, tagged with its part ("side" or "sum")."""
    name = unique_name(graph, f"{prefix}/outliers_{op.lower()}")
    return ir.node(op, inputs, attributes=attrs, outputs=outputs, name=name, metadata_props={SPLIT_KEY: part})


def _act_region(start: ir.Value, stops: set[str]) -> list[ir.Node]:
    """The elementwise nodes from the gate/up outputs (``stops``) to down_proj's input ``start``."""
    found: dict[str, ir.Node] = {}
    todo = [start]
    while todo:
        value = todo.pop()
        if value.name in stops or is_const(value):
            continue
        node = value.producer()
        if node is None or as_linear(node) is not None or node.op_type in ("MatMul", "Gemm") or len(found) > 32:
            raise OnnxqError("the MLP's activation does not lead from gate/up to down_proj", "report the model")
        if node.name not in found:
            found[node.name] = node
            todo.extend(v for v in node.inputs if v is not None)
    return list(found.values())


def _columns(graph: ir.Graph, name: str, columns: list[int], zero: bool) -> np.ndarray:
    """``W[:, columns]`` of an ``[in, out]`` initializer; with ``zero`` they are zeroed in place."""
    weight = const_array(graph.initializers.get(name))
    if weight is None:
        raise OnnxqError(f"weight {name!r} is not an initializer", "run the canonical rewrites first")
    picked = np.ascontiguousarray(weight[:, columns])
    if zero:
        weight = weight.copy()
        weight[:, columns] = 0.0
        graph.initializers[name].const_value = ir.tensor(weight.astype(np.float32), name=name)
    return picked


def _side_input(
    graph: ir.Graph, v: ir.Value | None, copies: dict[str, ir.Value], chosen: list[int], width: int
) -> ir.Value | None:
    """What the side copy of a node reads for ``v``: its side copy, a per-channel constant's columns, or ``v``."""
    if v is None:
        return None
    arr = const_array(v) if is_const(v) else None
    if arr is not None and arr.ndim and arr.shape[-1] == width:
        return add_initializer(graph, f"{v.name}.outliers", np.ascontiguousarray(arr[..., chosen]))
    return copies.get(v.name, v)


def split_outlier_channels(
    model: ir.Model, structure: Structure, channels: Mapping[int, Sequence[int]]
) -> RewriteResult:
    """Give each layer's MLP the side path for ``channels[layer]`` (layers absent: unchanged)."""
    graph = model.graph
    nodes = {n.name: n for n in graph}
    order = {n.name: i for i, n in enumerate(graph)}
    counts = {"layers": 0, "channels": 0}
    notes = []
    for layer in structure.layers:
        chosen = sorted({int(c) for c in channels.get(layer.index, ())})
        if not chosen:
            continue
        mlp = layer.mlp
        if any(lin.transposed or lin.bias is not None for lin in (mlp.gate, mlp.up, mlp.down)):
            raise OnnxqError(
                f"layer {layer.index}: an MLP linear is transposed or has a bias", "run untie_weights first"
            )
        if chosen[0] < 0 or chosen[-1] >= mlp.intermediate:
            raise OnnxqError(
                f"layer {layer.index}: channel {chosen[-1]} is outside 0..{mlp.intermediate - 1}", "pass valid channels"
            )
        gate, up, down = nodes[mlp.gate.node], nodes[mlp.up.node], nodes[mlp.down.node]
        h, y = gate.inputs[0], down.outputs[0]
        assert h is not None and down.inputs[0] is not None
        if y.is_graph_output():
            raise OnnxqError(f"down_proj {mlp.down.node!r} writes a graph output", "export with a logits output")
        region = sorted(
            _act_region(down.inputs[0], {gate.outputs[0].name, up.outputs[0].name}), key=lambda n: order[n.name]
        )
        readers = list(y.uses())
        k = len(chosen)
        prefix = mlp.down.node
        side: list[ir.Node] = []
        copies: dict[str, ir.Value] = {}
        for lin, fc in ((mlp.gate, gate), (mlp.up, up)):
            w = add_initializer(graph, f"{lin.weight}.outliers", _columns(graph, lin.weight, chosen, zero=True))
            out = _value(graph, fc.outputs[0], "outliers", k)
            side.append(_node(graph, prefix, "MatMul", [h, w], [out], "side", {}))
            copies[fc.outputs[0].name] = out
        for node in region:  # the activation, on k channels
            inputs = [_side_input(graph, v, copies, chosen, mlp.intermediate) for v in node.inputs]
            outs = [_value(graph, o, "outliers", k) for o in node.outputs]
            copies.update({o.name: c for o, c in zip(node.outputs, outs, strict=True)})
            side.append(
                _node(graph, prefix, node.op_type, inputs, outs, "side", {a.name: a for a in node.attributes.values()})
            )
        down_w = const_array(graph.initializers.get(mlp.down.weight))
        assert down_w is not None
        w = add_initializer(graph, f"{mlp.down.weight}.outliers", np.ascontiguousarray(down_w[chosen]))
        y_out, y_sum = _value(graph, y, "outliers"), _value(graph, y, "sum")
        side.append(_node(graph, prefix, "MatMul", [copies[down.inputs[0].name], w], [y_out], "side", {}))
        zeroed = down_w.copy()
        zeroed[chosen] = 0.0  # reads act(0)·0 there anyway; zero keeps the weight's range honest
        graph.initializers[mlp.down.weight].const_value = ir.tensor(zeroed.astype(np.float32), name=mlp.down.weight)
        graph.insert_before(down, side)
        graph.insert_after(down, _node(graph, prefix, "Add", [y, y_out], [y_sum], "sum", {}))
        for use in readers:
            use.node.replace_input_with(use.idx, y_sum)
        counts["layers"] += 1
        counts["channels"] += k
        notes.append(f"layer {layer.index}: {', '.join(map(str, chosen))}")
    return RewriteResult(model, "outlier channels", counts, tuple(notes))
