"""Grouped-query attention without repeating K and V.

Exported GQA repeats each K/V head for its G query heads (``Unsqueeze → Expand → Reshape``). The
HTP has no 16-bit signed Expand (measured: rejected on the QNN EP), and the copies cost memory
traffic. The same numbers come out if the query heads of one group are stacked along the sequence
axis instead:

    q [1, H, S, D] → reshape [1, KV, G·S, D];   scores = q_g @ kᵀ      → [1, KV, G·S, S]
    probs @ v [1, KV, S, D]                   → [1, KV, G·S, D] → reshape [1, H, S, D]

(head ``h`` uses K/V head ``h // G`` in both forms). The additive mask is tiled G times along its
query axis (a constant is tiled in place; a mask input, as in KV-cache step graphs, through a
Concat). Exact: only data movement changes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.core.ir import add_initializer, const_array, unique_name
from rewrites.base import RewriteResult
from rewrites.structure import Attention, Structure, _Graph, forward_region

_PERM_LAST2 = [0, 1, 3, 2]


def _repeat_source(value: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """If ``value`` is ``Reshape(Expand(Unsqueeze(src)))``, return src and the three nodes."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    return unsq.inputs[0], [reshape, expand, unsq]


def _rewrite_one(model: ir.Model, g: _Graph, attn: Attention, tiled_masks: dict[tuple[str, int], ir.Value]) -> bool:
    graph = model.graph
    qk, av = g.nodes[attn.qk], g.nodes[attn.av]
    kt = qk.inputs[1]
    transpose = kt.producer() if kt is not None else None
    if transpose is None or transpose.op_type != "Transpose":
        return False
    perm = transpose.attributes.get("perm")
    if perm is None or list(perm.value) != _PERM_LAST2:
        return False
    k_rep = _repeat_source(transpose.inputs[0])
    v_rep = _repeat_source(av.inputs[1])
    if k_rep is None or v_rep is None:
        return False
    k_src, v_src = k_rep[0], v_rep[0]
    q = qk.inputs[0]
    if q is None or q.shape is None or k_src.shape is None:
        return False
    _, heads, seq, dim = (int(d) for d in q.shape)
    kv = int(k_src.shape[1])
    keys = int(k_src.shape[2])  # = seq, or past + seq in a KV-cache step graph
    group = heads // kv
    scores_region = forward_region(g, qk.outputs[0].name, {attn.softmax})
    mask_nodes = [n for n in scores_region if n.op_type == "Add"]
    for node in mask_nodes:
        for idx, inp in enumerate(node.inputs):
            if inp is None or inp.producer() in scores_region or inp is qk.outputs[0]:
                continue
            arr = const_array(inp)
            if arr is not None and arr.size == 1:
                continue
            key = (inp.name, group)
            if key not in tiled_masks:  # one tiled copy per shared mask, not one per layer
                tiled_masks[key] = _tile_mask(graph, inp, arr, seq, group)
            if tiled_masks[key] is None:
                return False
            node.replace_input_with(idx, tiled_masks[key])

    shape_q = add_initializer(graph, f"{attn.qk}.q_shape", np.array([1, kv, group * seq, dim], dtype=np.int64))
    q_g = ir.Value(name=unique_name(graph, f"{q.name}.grouped"), type=q.type, shape=ir.Shape([1, kv, group * seq, dim]))
    k_t = ir.Value(name=unique_name(graph, f"{k_src.name}.t"), type=k_src.type, shape=ir.Shape([1, kv, dim, keys]))
    graph.insert_before(
        qk,
        [
            ir.node("Reshape", [q, shape_q], outputs=[q_g], name=unique_name(graph, f"{attn.qk}/group_q")),
            ir.node(
                "Transpose", [k_src], {"perm": _PERM_LAST2}, outputs=[k_t], name=unique_name(graph, f"{attn.qk}/k_t")
            ),
        ],
    )
    qk.replace_input_with(0, q_g)
    qk.replace_input_with(1, k_t)
    av.replace_input_with(1, v_src)
    new_scores = ir.Shape([1, kv, group * seq, keys])
    for node in [qk, *scores_region, g.nodes[attn.softmax]]:
        for out in node.outputs:
            out.shape = new_scores
    av_out = av.outputs[0]
    av_out.shape = ir.Shape([1, kv, group * seq, dim])
    shape_o = add_initializer(graph, f"{attn.av}.o_shape", np.array([1, heads, seq, dim], dtype=np.int64))
    merged = ir.Value(
        name=unique_name(graph, f"{av_out.name}.heads"), type=av_out.type, shape=ir.Shape([1, heads, seq, dim])
    )
    readers = [(u.node, u.idx) for u in av_out.uses()]
    ungroup = ir.node("Reshape", [av_out, shape_o], outputs=[merged], name=unique_name(graph, f"{attn.av}/ungroup"))
    for node, idx in readers:
        node.replace_input_with(idx, merged)
    graph.insert_after(av, ungroup)
    for node in (transpose, *k_rep[1], *v_rep[1]):
        if all(not o.uses() for o in node.outputs):
            graph.remove(node, safe=True)
    return True


def _tile_mask(graph: ir.Graph, mask: ir.Value, arr: np.ndarray | None, seq: int, group: int) -> ir.Value | None:
    """The mask repeated ``group`` times along its query axis: a constant, or a Concat of an input."""
    if arr is not None:
        if arr.ndim < 2 or arr.shape[-2] != seq:
            return None
        tiled = np.tile(arr.reshape(-1, seq, arr.shape[-1])[:1], (1, group, 1)).reshape(1, 1, group * seq, -1)
        return add_initializer(graph, f"{mask.name}.gqa", tiled.astype(arr.dtype))
    shape = list(mask.shape) if mask.shape is not None else []
    if len(shape) != 4 or shape[:2] != [1, 1] or shape[2] != seq:
        return None
    out = ir.Value(
        name=unique_name(graph, f"{mask.name}.gqa"), type=mask.type, shape=ir.Shape([1, 1, group * seq, shape[3]])
    )
    node = ir.node("Concat", [mask] * group, {"axis": 2}, outputs=[out], name=unique_name(graph, f"{mask.name}/gqa"))
    producer = mask.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(next(iter(graph)), node)
    return out


def group_query_attention(model: ir.Model, structure: Structure) -> RewriteResult:
    """Rewrite every GQA layer to the repeat-free form (layers without repeats are left alone)."""
    g = _Graph(model)
    done = 0
    tiled: dict[tuple[str, int], ir.Value] = {}
    for layer in structure.layers:
        if layer.attn.num_kv_heads < layer.attn.num_heads and _rewrite_one(model, g, layer.attn, tiled):
            done += 1
    for name in [n for n, v in model.graph.initializers.items() if not v.uses()]:
        model.graph.initializers.pop(name)
    return RewriteResult(model, "grouped-query attention", {"layers without K/V repeat": done})
