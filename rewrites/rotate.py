"""Merge rotations into the weights: RMSNorm folding, R1 on the residual stream, R2 per head, and
the optional run-time Hadamards R3 (Q/K after RoPE) and R4 (down_proj input).

The algebra, in ONNX's ``[in, out]`` weight layout (``y = x W``):

- fold: ``RMSNorm(x) γ`` then ``W`` equals ``RMSNorm(x)`` then ``diag(γ) W``; afterwards γ = 1.
- R1: for orthogonal R, ``RMSNorm(x R) = RMSNorm(x) R`` (the norm of a row is unchanged). So with
  the embedding ``E ← E R``, every MatMul that writes the stream ``W ← W R`` (o_proj, down_proj) and
  every one that reads it ``W ← Rᵀ W`` (q, k, v, gate, up, lm_head), the stream carries ``x R``
  everywhere and the logits are unchanged. γ must be folded first (``diag(γ)`` does not commute).
- R2: V's heads ``v_j ← v_j R2`` (columns of v_proj), and o_proj's input rows of every query head
  ``← R2ᵀ`` (attention mixes tokens, not channels, so R2 passes through it).
- R3 / R4: ``x ← x H`` at run time as a constant MatMul (R4, where H = diag(d) (A ⊗ B), as two
  small MatMuls on an m x p view of x); for R4 down_proj's weight takes ``Hᵀ``,
  for R3 both Q and K are rotated, so ``Q Kᵀ`` is unchanged.

All exact up to float rounding: the rewritten float model matches the original to ~1e-5.
Each function works in place on the model and returns a :class:`RewriteResult` with counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import add_initializer, const_array, unique_name
from onnxq.core.memory import slices
from rewrites.base import RewriteResult
from rewrites.hadamard import check_orthogonal, hadamard_factors, rotation
from rewrites.structure import Linear, Norm, Structure

ONLINE_KEY = "onnxq.online_rotation"


def _weight_name(graph: ir.Graph, lin: Linear) -> str:
    """The linear's ``[in, out]`` weight initializer, or the error that it has none."""
    if lin.transposed:
        raise OnnxqError(f"linear {lin.node!r} keeps its weight transposed", "run untie_weights first")
    if const_array(graph.initializers.get(lin.weight)) is None:
        raise OnnxqError(f"weight {lin.weight!r} of {lin.node!r} is not an initializer", "run untie_weights first")
    return lin.weight


def _weight(graph: ir.Graph, lin: Linear) -> np.ndarray:
    arr = const_array(graph.initializers[_weight_name(graph, lin)])
    assert arr is not None
    return arr.astype(np.float64)


def _set(graph: ir.Graph, name: str, array: np.ndarray) -> None:
    value = graph.initializers[name]
    value.const_value = ir.tensor(array.astype(np.float32), name=name)


#: float64 bytes above which a rotated table is computed in blocks: an embedding or lm_head of
#: a 128k vocabulary would otherwise hold two float64 copies of itself
BLOCK_BYTES = 1 << 28


def _rotate_table(graph: ir.Graph, name: str, r: np.ndarray, *, left: bool) -> None:
    """``W ← rᵀ W`` (``left``) or ``W ← W r``, in float64, stored as float32.

    A large table goes in blocks of the dimension ``r`` does not touch, each block in float64 and
    straight into the float32 result, so no float64 copy of the whole table is ever held.
    """
    arr = const_array(graph.initializers[name])
    assert arr is not None
    if arr.size * 8 <= BLOCK_BYTES:
        _set(graph, name, r.T @ arr.astype(np.float64) if left else arr.astype(np.float64) @ r)
        return
    out = np.empty(arr.shape, dtype=np.float32)
    free, touched = (arr.shape[1], arr.shape[0]) if left else (arr.shape[0], arr.shape[1])
    for block in slices(free, 8 * touched, BLOCK_BYTES):
        if left:
            out[:, block] = r.T @ arr[:, block].astype(np.float64)
        else:
            out[block] = arr[block].astype(np.float64) @ r
    graph.initializers[name].const_value = ir.tensor(out, name=name)


def _shared(graph: ir.Graph, name: str) -> bool:
    value = graph.initializers[name]
    return len({id(u.node) for u in value.uses()}) > 1


def readers_of(structure: Structure) -> list[tuple[Norm, tuple[Linear, ...]]]:
    """Each norm with the linears that read its output."""
    out: list[tuple[Norm, tuple[Linear, ...]]] = []
    for layer in structure.layers:
        out.append((layer.attn_norm, (layer.attn.q, layer.attn.k, layer.attn.v)))
        out.append((layer.mlp_norm, (layer.mlp.gate, layer.mlp.up)))
    out.append((structure.final_norm, (structure.lm_head,)))
    return out


def fold_norm_weights(model: ir.Model, structure: Structure) -> RewriteResult:
    """Fold every RMSNorm's γ into the MatMuls that read it, leaving γ = 1."""
    graph = model.graph
    nodes = {n.name: n for n in graph}
    folded = updated = 0
    for norm, readers in readers_of(structure):
        if norm.gamma is None:
            continue
        gamma = const_array(graph.initializers[norm.gamma])
        assert gamma is not None
        if np.array_equal(gamma, np.ones_like(gamma)):
            continue
        for lin in readers:
            if _shared(graph, lin.weight):
                raise OnnxqError(f"weight {lin.weight!r} is shared", "run untie_weights first")
            _set(graph, lin.weight, gamma.astype(np.float64)[:, None] * _weight(graph, lin))
            updated += 1
        if norm.kind == "fused":
            fused = nodes[norm.nodes[0]]
            ones = add_initializer(graph, f"{norm.output}.gamma1", np.ones(gamma.shape, dtype=np.float32))
            fused.replace_input_with(1, ones)
        else:  # decomposed: drop the final Mul by γ
            gmul = nodes[norm.nodes[-1]]
            x = gmul.inputs[0] if gmul.inputs[1].name == norm.gamma else gmul.inputs[1]
            gmul.outputs[0].replace_all_uses_with(x, replace_graph_outputs=True)
            graph.remove(gmul, safe=True)
        folded += 1
    _drop_unused(graph)
    return RewriteResult(model, "fold RMSNorm weights", {"RMSNorm weights folded": folded, "MatMuls updated": updated})


def _gamma_free(graph: ir.Graph, structure: Structure) -> bool:
    nodes = {n.name: n for n in graph}
    for norm in structure.norms():
        if norm.kind == "fused":
            scale = const_array(nodes[norm.nodes[0]].inputs[1])
            if scale is None or not np.allclose(scale, 1.0):
                return False
        elif norm.gamma is not None:
            return False
    return True


def rotate_residual(model: ir.Model, structure: Structure, r1: np.ndarray) -> RewriteResult:
    """Merge R1 (hidden × hidden, orthogonal) into the embedding and every stream reader/writer."""
    graph = model.graph
    hidden = structure.hidden_size
    r1 = check_orthogonal(r1, hidden, "R1")
    if not _gamma_free(graph, structure):
        raise OnnxqError("R1 needs RMSNorm weights folded into the MatMuls first", "run fold_norm_weights first")
    table = graph.initializers[structure.embed_table]
    if _shared(graph, structure.embed_table):
        raise OnnxqError("the embedding table is shared with a MatMul", "run untie_weights first")
    _rotate_table(graph, table.name, r1, left=False)
    readers = writers = 0
    for _, lins in readers_of(structure):
        for lin in lins:
            _rotate_table(graph, _weight_name(graph, lin), r1, left=True)
            readers += 1
    for layer in structure.layers:
        for lin in (layer.attn.o, layer.mlp.down):
            _rotate_table(graph, _weight_name(graph, lin), r1, left=False)
            if lin.bias is not None:
                bias = const_array(graph.initializers[lin.bias])
                assert bias is not None
                _set(graph, lin.bias, bias.astype(np.float64) @ r1)
            writers += 1
    return RewriteResult(
        model, "R1", {"MatMuls reading the stream": readers, "MatMuls writing it": writers, "embedding tables": 1}
    )


def rotate_heads(model: ir.Model, structure: Structure, r2: np.ndarray | Sequence[np.ndarray]) -> RewriteResult:
    """Merge R2 (head_dim × head_dim; one, or one per layer) between v_proj and o_proj."""
    graph = model.graph
    count = 0
    for i, layer in enumerate(structure.layers):
        a = layer.attn
        d = a.head_dim
        r = check_orthogonal(r2[i] if isinstance(r2, (list, tuple)) else r2, d, f"R2 of layer {i}")
        wv = _weight(graph, a.v)  # [hidden, kv * d]
        wv = (wv.reshape(wv.shape[0], a.num_kv_heads, d) @ r).reshape(wv.shape)
        _set(graph, a.v.weight, wv)
        if a.v.bias is not None:  # Qwen2: the bias is part of each head's value
            bv = const_array(graph.initializers[a.v.bias])
            assert bv is not None
            _set(graph, a.v.bias, (bv.astype(np.float64).reshape(a.num_kv_heads, d) @ r).reshape(bv.shape))
        wo = _weight(graph, a.o)  # [heads * d, hidden]
        wo = (r.T @ wo.reshape(a.num_heads, d, wo.shape[1])).reshape(wo.shape)
        _set(graph, a.o.weight, wo)
        count += 1
    return RewriteResult(model, "R2", {"layers": count})


def _insert_matmul(graph: ir.Graph, value: ir.Value, matrix: np.ndarray, before: ir.Node, tag: str) -> ir.Value:
    """``value @ matrix`` as a constant MatMul placed before ``before``; returns its output."""
    weight = add_initializer(graph, f"{value.name}.{tag}", matrix.astype(np.float32))
    out = ir.Value(name=unique_name(graph, f"{value.name}.{tag}_out"), type=value.type, shape=value.shape)
    node = ir.node(
        "MatMul",
        [value, weight],
        outputs=[out],
        name=unique_name(graph, f"{value.name}/{tag}"),
        metadata_props={ONLINE_KEY: tag},
    )
    graph.insert_before(before, node)
    return out


def _insert_factored(
    graph: ir.Graph, value: ir.Value, factors: tuple[np.ndarray, np.ndarray, np.ndarray], before: ir.Node, tag: str
) -> ir.Value:
    """``value @ diag(d) (A ⊗ B)`` as signs, then B on the last m x p block axis, then A on the other.

    For n = 1536 = 12 x 128 that is 140 multiply-adds per value instead of 1536. ``A`` and ``B`` are
    stored as ±1/√m, ±1/√p (orthogonal, every entry one per-tensor step); ``d`` keeps the signs.
    """
    d, a, b = factors
    m, p = a.shape[0], b.shape[0]
    dims = list(value.shape)
    lead = [int(x) for x in dims[:-1]]
    name = value.name
    steps: list[tuple[str, list[ir.Value], dict, list[int]]] = [
        ("Mul", [add_initializer(graph, f"{name}.{tag}_signs", (d * np.sqrt(m * p)).astype(np.float32))], {}, dims),
        (
            "Reshape",
            [add_initializer(graph, f"{name}.{tag}_blocks", np.asarray([*lead, m, p], np.int64))],
            {},
            [*lead, m, p],
        ),
        ("MatMul", [add_initializer(graph, f"{name}.{tag}_b", (b / np.sqrt(p)).astype(np.float32))], {}, [*lead, m, p]),
        ("Transpose", [], {"perm": [*range(len(lead)), len(lead) + 1, len(lead)]}, [*lead, p, m]),
        ("MatMul", [add_initializer(graph, f"{name}.{tag}_a", (a / np.sqrt(m)).astype(np.float32))], {}, [*lead, p, m]),
        ("Transpose", [], {"perm": [*range(len(lead)), len(lead) + 1, len(lead)]}, [*lead, m, p]),
        ("Reshape", [add_initializer(graph, f"{name}.{tag}_flat", np.asarray(dims, np.int64))], {}, dims),
    ]
    current = value
    for op, consts, attrs, shape in steps:
        out = ir.Value(name=unique_name(graph, f"{name}.{tag}_{op.lower()}"), type=value.type, shape=ir.Shape(shape))
        node = ir.node(
            op,
            [current, *consts],
            attributes=attrs,
            outputs=[out],
            name=unique_name(graph, f"{name}/{tag}_{op.lower()}"),
            metadata_props={ONLINE_KEY: tag},
        )
        graph.insert_before(before, node)
        current = out
    return current


def online_hadamard(model: ir.Model, structure: Structure, which: Sequence[str], seed: int = 0) -> RewriteResult:
    """Insert run-time rotations: ``r4`` before each down_proj, ``r3`` on Q and K before QKᵀ."""
    graph = model.graph
    nodes = {n.name: n for n in graph}
    counts = {"R3 (Q/K) pairs": 0, "R4 (down_proj input)": 0}
    unknown = set(which) - {"r3", "r4"}
    if unknown:
        raise OnnxqError(f"unknown online rotation {sorted(unknown)}", "use --online-hadamard r3,r4")
    for i, layer in enumerate(structure.layers):
        if "r4" in which:
            down = nodes[layer.mlp.down.node]
            inter = int(graph.initializers[layer.mlp.down.weight].shape[0])
            h, _ = rotation(inter, seed + 7919 * (i + 1))
            factors = hadamard_factors(inter, seed + 7919 * (i + 1))
            x = down.inputs[0]
            if factors is not None and x.shape is not None and min(f.shape[0] for f in factors[1:]) > 1:
                rotated = _insert_factored(graph, x, factors, down, "r4")
            else:  # a random orthogonal matrix has no factors: one dense MatMul
                rotated = _insert_matmul(graph, x, h, down, "r4")
            down.replace_input_with(0, rotated)
            _set(graph, layer.mlp.down.weight, h.T @ _weight(graph, layer.mlp.down))
            counts["R4 (down_proj input)"] += 1
        if "r3" in which:
            qk = nodes[layer.attn.qk]
            h, _ = rotation(layer.attn.head_dim, seed + 104729 * (i + 1))
            q_in = qk.inputs[0]
            qk.replace_input_with(0, _insert_matmul(graph, q_in, h, qk, "r3"))
            kt = qk.inputs[1].producer()
            if kt is None or kt.op_type != "Transpose":
                raise OnnxqError(f"layer {i}: K reaches QKᵀ without a Transpose", "R3 needs the exported form")
            kt.replace_input_with(0, _insert_matmul(graph, kt.inputs[0], h, kt, "r3"))
            counts["R3 (Q/K) pairs"] += 1
    return RewriteResult(model, "online Hadamard", counts)


def hadamard_rotations(structure: Structure, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """R1 and one R2 per layer, randomized Hadamard where possible; plus notes on what was built."""
    r1, kind1 = rotation(structure.hidden_size, seed)
    d = structure.layers[0].attn.head_dim
    r2 = []
    kinds = set()
    for i in range(len(structure.layers)):
        r, kind = rotation(d, seed + 1 + i)
        r2.append(r)
        kinds.add(kind)
    notes = [f"R1 {structure.hidden_size}x{structure.hidden_size}: {kind1}", f"R2 {d}x{d}: {', '.join(sorted(kinds))}"]
    return r1, r2, notes


def _drop_unused(graph: ir.Graph) -> None:
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
