"""Bring any exported decoder graph to the one form the quantizer expects.

- :func:`specialize_inputs`: static ``[1, S]`` token ids; an ``attention_mask`` of ones and
  ``position_ids`` 0..S-1 become constants (optimum and torch.onnx exports take them as inputs).
- :func:`fold_constants`: whatever is computable from constants becomes a constant (mask, RoPE).
- :func:`finite_mask`: additive masks of -3.4e38 (``finfo.min``) become a finite value, so the
  Softmax input has a range a static quantizer can use.
- :func:`untie_weights`: each MatMul reads its own ``[in, out]`` weight; a tied embedding/lm_head
  (one initializer behind a Gather and a Transpose) becomes two, since they quantize differently.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import add_initializer, const_array, is_const, unique_name
from rewrites.base import RewriteResult

MASK_FLOOR = -1e30
#: ops the optimizer keeps by default, which folding without its size rules must keep too
KEPT = ("ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def specialize_inputs(model: ir.Model, seq_len: int) -> RewriteResult:
    """Fix token-id shapes to ``[1, seq_len]`` and turn mask/position inputs into constants."""
    graph = model.graph
    counts = {"fixed": 0, "constant inputs": 0}
    for value in list(graph.inputs):
        name = value.name or ""
        if name == "input_ids":
            if value.shape is None or list(value.shape) != [1, seq_len]:
                value.shape = ir.Shape([1, seq_len])
                counts["fixed"] += 1
        elif name in ("attention_mask", "position_ids"):
            dtype = value.dtype or ir.DataType.INT64
            array = np.ones((1, seq_len)) if name == "attention_mask" else np.arange(seq_len)[None, :]
            tensor = ir.tensor(array.astype(dtype.numpy()), name=name)
            graph.inputs.remove(value)
            value.const_value = tensor
            value.shape = ir.Shape([1, seq_len])
            graph.register_initializer(value)
            counts["constant inputs"] += 1
        elif name.startswith(("past_key_values", "past.")):
            raise OnnxqError(
                f"input {name!r} is a KV cache; the scoring graph has none",
                "export without past key values (optimum: --task text-generation, onnxq export)",
            )
    return RewriteResult(model, "specialize inputs", counts)


def fold_constants(model: ir.Model) -> RewriteResult:
    """Fold subgraphs whose inputs are all constant, whatever their size. A node that reads a weight
    above 2M elements goes by the optimizer's own size rules instead, which keep a tied lm_head's
    Transpose (untying is the quantizer's decision).

    A size limit alone would leave the [S, S] causal mask computed at run time past 1448 tokens;
    every decoder layer would then read it from outside itself, and no pass could run one layer at
    a time.
    """
    import onnxscript.optimizer
    from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

    before = len(model.graph)
    ShapeInferencePass()(model)
    limit = 1 << 21
    initializers = model.graph.initializers.values()
    weights = {id(v) for v in initializers if v.const_value is not None and v.const_value.size > limit}

    def should_fold(node: ir.Node) -> bool | None:  # None: the optimizer's own rules (it keeps Q/DQ)
        if node.op_type in KEPT or any(id(v) in weights for v in node.inputs if v is not None):
            return None
        return True

    onnxscript.optimizer.fold_constants(
        model, input_size_limit=limit, output_size_limit=1 << 40, should_fold=should_fold
    )
    RemoveUnusedNodesPass()(model)
    return RewriteResult(model, "fold constants", {"nodes removed": before - len(model.graph)})


def finite_mask(model: ir.Model, value: float) -> RewriteResult:
    """Replace additive-mask entries below -1e30 by ``value`` in constants feeding Add/Where."""
    changed = 0
    for init in list(model.graph.initializers.values()):
        arr = const_array(init)
        if arr is None or arr.dtype.kind != "f" or arr.size == 0 or float(arr.min()) > MASK_FLOOR:
            continue
        uses = {u.node.op_type for u in init.uses()}
        if not uses & {"Add", "Where"}:
            continue
        fixed = np.where(arr <= MASK_FLOOR, np.asarray(value, dtype=arr.dtype), arr)
        init.const_value = ir.tensor(fixed, name=init.name)
        changed += 1
    return RewriteResult(model, "finite mask", {"mask constants": changed})


def untie_weights(model: ir.Model) -> RewriteResult:
    """Give every MatMul a private ``[in, out]`` weight initializer.

    ``MatMul(x, Transpose(W))`` becomes ``MatMul(x, Wᵀ)`` with ``Wᵀ`` materialised; a weight read by
    several MatMuls, or also by a Gather, is copied so that each can be quantized (and rotated)
    on its own.
    """
    graph = model.graph
    counts = {"transposes folded": 0, "weights untied": 0}
    owners: dict[str, int] = {}
    for node in list(graph):
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        b = node.inputs[1]
        producer = b.producer()
        if producer is not None and producer.op_type == "Transpose" and is_const(producer.inputs[0]):
            perm = producer.attributes.get("perm")
            source = producer.inputs[0]
            arr = const_array(source)
            if arr is None or arr.ndim != 2 or (perm is not None and list(perm.value) != [1, 0]):
                continue
            new = add_initializer(graph, f"{source.name}.T", np.ascontiguousarray(arr.T))
            node.replace_input_with(1, new)
            if not producer.outputs[0].uses():
                graph.remove(producer, safe=True)
            counts["transposes folded"] += 1
            continue
        if b.is_initializer():
            owners[b.name] = owners.get(b.name, 0) + 1
            shared = owners[b.name] > 1 or any(u.node.op_type != "MatMul" for u in b.uses())
            if shared:
                arr = const_array(b)
                assert arr is not None
                new = add_initializer(graph, f"{b.name}.untied", arr.copy())
                node.replace_input_with(1, new)
                counts["weights untied"] += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return RewriteResult(model, "untie weights", counts)


def fuse_rms_norm(model: ir.Model) -> RewriteResult:
    """Replace each decomposed RMSNorm by one ``SimplifiedLayerNormalization`` (QNN's RmsNorm).

    On the HTP the decomposed form is unusable at 16 bits: its Reciprocal of a small input is off
    by up to 90 % (measured on the QNN EP with ``mean(x²)`` ≈ 0.003), while the fused op matches
    float to 7e-5. ONNX Runtime's CPU EP runs the same op, so CPU and HTP validate one graph.
    """
    from rewrites.structure import Norm, match_rms_norm

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "ReduceMean" or node.graph is None:
            continue
        found = match_rms_norm(node)
        if not isinstance(found, Norm):
            continue
        nodes = {n.name: n for n in graph}
        members = [nodes[name] for name in found.nodes]
        x = members[0].inputs[0]
        last = members[-1]
        out = last.outputs[0]
        if found.gamma is not None:
            gamma = graph.initializers[found.gamma]
        else:
            hidden = int(x.shape[-1]) if x is not None and x.shape is not None else None
            if hidden is None:
                continue
            gamma = add_initializer(graph, f"{out.name}.gamma", np.ones(hidden, dtype=np.float32))
        fused_out = ir.Value(name=unique_name(graph, f"{out.name}.rms"), type=out.type, shape=out.shape)
        fused = ir.node(
            "SimplifiedLayerNormalization",
            [x, gamma],
            {"axis": -1, "epsilon": float(found.eps)},
            outputs=[fused_out],
            name=unique_name(graph, f"{last.name}/rms_norm"),
        )
        graph.insert_before(members[0], fused)
        out.replace_all_uses_with(fused_out, replace_graph_outputs=True)
        graph.remove(members, safe=True)
        fused_out.name, out.name = out.name, fused_out.name  # keep the tensor name users know
        count += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return RewriteResult(model, "fuse RMSNorm", {"RMSNorms fused": count})


def decompose_rms_norm(model: ir.Model) -> RewriteResult:
    """Expand each ``SimplifiedLayerNormalization`` into ONNX ops (x / sqrt(mean(x²) + eps) · γ).

    The inverse of :func:`fuse_rms_norm`, for toolchains that read standard ONNX only (QAIRT's
    converter takes opset ≤ 22 and pattern-matches this form back into its RmsNorm). The output
    keeps its name, so an encoding given for it still applies.
    """
    norms = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]
    for node in norms:
        _decompose_one(model.graph, node)
    return RewriteResult(model, "decompose RMSNorm", {"RMSNorms decomposed": len(norms)})


def _decompose_one(graph: ir.Graph, node: ir.Node) -> None:
    x, gamma = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    assert x is not None and gamma is not None
    base = out.name
    two = add_initializer(graph, f"{base}.two", np.asarray(2.0, dtype=np.float32))
    axes = add_initializer(graph, f"{base}.axes", np.asarray([node.attributes.get_int("axis", -1)], dtype=np.int64))
    eps = add_initializer(graph, f"{base}.eps", np.asarray(node.attributes.get_float("epsilon", 1e-5), np.float32))
    chain = [
        ("Pow", "square", [x, two], {}),
        ("ReduceMean", "mean", [None, axes], {"keepdims": 1}),
        ("Add", "var_eps", [None, eps], {}),
        ("Sqrt", "rms", [None], {}),
        ("Div", "normed", [x, None], {}),
        ("Mul", "scaled", [None, gamma], {}),
    ]
    prev: ir.Value | None = None
    for op, tag, inputs, attrs in chain:
        args = [prev if v is None else v for v in inputs]
        new = ir.node(op, args, attrs or None, name=unique_name(graph, f"{node.name}/{tag}"))
        new.outputs[0].name = unique_name(graph, f"{base}.{tag}")
        new.outputs[0].type = out.type
        graph.insert_before(node, new)
        prev = new.outputs[0]
    assert prev is not None
    prev.shape = out.shape
    out.replace_all_uses_with(prev, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name, prev.name = f"{base}.fused", base  # keep the tensor name users (and encodings) know
