"""Find a decoder-only transformer's parts in an ONNX graph by pattern, never by node names.

The walk follows the residual stream: the embedding Gather starts it; each RMSNorm that reads it
opens a block whose linears are classified by what their outputs reach (two MatMuls between
activations make an attention block, a Sigmoid makes an MLP); the residual Add that the block's
last linear feeds continues the stream; the norm that reads the stream last feeds the lm_head.
This works the same on graphs from torch.onnx (dynamo or TorchScript) and from optimum, whatever
their naming.

:func:`discover` returns a :class:`Structure` or raises :class:`StructureError` naming the first
thing that did not match. :func:`tensor_roles` labels every activation with what it is
(``("down_in", 7)`` is layer 7's down_proj input), which precision policies and reports key on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import const_array, is_const

#: node metadata key of the outlier-channel split (:mod:`rewrites.outliers`): "side" or "sum"
SPLIT_KEY = "onnxq.outlier_split"

#: Ops that move or select data without computing new values.
DATA_MOVEMENT = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Expand",
        "Slice",
        "Gather",
        "Concat",
        "Split",
        "Flatten",
        "Identity",
        "Tile",
    }
)


class StructureError(OnnxqError):
    """The graph is not a decoder-only transformer we recognise."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"transformer structure not recognised: {problem}",
            "quantize with --rotate none (no structure needed), or export with `onnxq export`",
        )


@dataclass(frozen=True)
class Norm:
    """An RMSNorm instance: ``output = input / sqrt(mean(input²) + eps) * gamma``."""

    input: str
    output: str
    gamma: str | None
    eps: float
    nodes: tuple[str, ...]
    kind: str = "rms"


@dataclass(frozen=True)
class Linear:
    """A MatMul (or Gemm) with a constant weight, stored ``[in, out]`` unless ``transposed``."""

    node: str
    input: str
    output: str
    weight: str
    transposed: bool = False
    via_transpose: str | None = None
    bias: str | None = None
    bias_node: str | None = None

    @property
    def value(self) -> str:
        """The linear's result after its bias (what the rest of the graph reads)."""
        return self.output


@dataclass(frozen=True)
class Attention:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    qk: str
    av: str
    softmax: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Mlp:
    gate: Linear
    up: Linear
    down: Linear
    act: str
    intermediate: int


@dataclass(frozen=True)
class Layer:
    index: int
    attn_norm: Norm
    attn: Attention
    attn_residual: str
    mlp_norm: Norm
    mlp: Mlp
    mlp_residual: str

    def linears(self) -> tuple[Linear, ...]:
        a, m = self.attn, self.mlp
        return (a.q, a.k, a.v, a.o, m.gate, m.up, m.down)


@dataclass(frozen=True)
class Structure:
    embed_node: str
    embed_table: str
    layers: tuple[Layer, ...]
    final_norm: Norm
    lm_head: Linear
    hidden_size: int
    tied: bool
    notes: tuple[str, ...] = field(default=())

    def norms(self) -> list[Norm]:
        out = []
        for layer in self.layers:
            out += [layer.attn_norm, layer.mlp_norm]
        return [*out, self.final_norm]

    def linears(self) -> list[Linear]:
        out: list[Linear] = []
        for layer in self.layers:
            out += layer.linears()
        return [*out, self.lm_head]

    def describe(self) -> str:
        a = self.layers[0].attn
        m = self.layers[0].mlp
        return (
            f"{len(self.layers)} layers, hidden {self.hidden_size}, "
            f"attention {a.num_heads} heads x {a.head_dim} ({a.num_kv_heads} KV heads), "
            f"MLP {m.act} x {m.intermediate}, {len(self.norms())} RMSNorms, "
            f"lm_head {'tied to' if self.tied else 'separate from'} the embedding"
        )


class _Graph:
    """Name-indexed view of an onnx_ir graph."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.nodes = {n.name: n for n in self.graph}
        self.values: dict[str, ir.Value] = {}
        for v in self.graph.inputs:
            self.values[v.name] = v
        for name, v in self.graph.initializers.items():
            self.values[name] = v
        for n in self.graph:
            for o in n.outputs:
                self.values[o.name] = o

    def consumers(self, value: str) -> list[ir.Node]:
        v = self.values.get(value)
        if v is None:
            return []
        seen: dict[int, ir.Node] = {}
        for use in v.uses():
            seen[id(use.node)] = use.node
        return list(seen.values())

    def producer(self, value: str) -> ir.Node | None:
        v = self.values.get(value)
        return None if v is None else v.producer()


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    ins = [v for v in node.inputs if v is not None]
    if len(ins) != 2:
        return None
    return ins[1] if ins[0] is value else ins[0] if ins[1] is value else None


def _single_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    users = [u.node for u in value.uses()]
    if len(users) == 1 and users[0].op_type == op_type:
        return users[0]
    return None


def match_rms_norm(mean: ir.Node) -> Norm | str:
    """Match ``x * 1/sqrt(mean(x*x) + eps) [* gamma]`` rooted at a ReduceMean; else say why not."""
    if mean.op_type != "ReduceMean":
        return "not a ReduceMean"
    square = mean.inputs[0].producer() if mean.inputs[0] is not None else None
    if square is None:
        return "ReduceMean input is not computed"
    is_pow = square.op_type == "Pow" and _scalar(square.inputs[1]) == 2.0
    is_mul = square.op_type == "Mul" and square.inputs[0] is square.inputs[1]
    if is_pow or is_mul:
        x = square.inputs[0]
    elif square.op_type == "Sub":
        return "mean subtraction: a LayerNorm, not an RMSNorm"
    else:
        return f"ReduceMean reads {square.op_type}, not x*x"
    axes = const_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
    if axes is None:
        attr = mean.attributes.get("axes")
        axes = np.asarray(attr.value) if attr is not None else None
    keep = mean.attributes.get("keepdims")
    if axes is None or axes.size != 1 or (keep is not None and keep.value == 0):
        return "ReduceMean is not over one axis with keepdims"
    add = _single_consumer(mean.outputs[0], "Add")
    if add is None:
        return "ReduceMean is not followed by Add(eps)"
    eps = _scalar(_other(add, mean.outputs[0]))
    if eps is None:
        return "Add after ReduceMean is not a scalar eps"
    sqrt = _single_consumer(add.outputs[0], "Sqrt")
    nodes = [square, mean, add]
    if sqrt is None:
        return "eps is not followed by Sqrt"
    nodes.append(sqrt)
    recip = _single_consumer(sqrt.outputs[0], "Reciprocal")
    div = _single_consumer(sqrt.outputs[0], "Div")
    if recip is None and div is not None and _scalar(div.inputs[0]) == 1.0:
        recip = div  # optimum's 1 / sqrt(.)
    if recip is not None:
        nodes.append(recip)
        mul = _single_consumer(recip.outputs[0], "Mul")
        if mul is None or _other(mul, recip.outputs[0]) is not x:
            return "1/sqrt(.) is not multiplied with the norm's input"
        scale_node = mul
    else:
        if div is None or div.inputs[0] is not x:
            return "sqrt(.) is not followed by Reciprocal or Div"
        scale_node = div
    nodes.append(scale_node)
    out = scale_node.outputs[0]
    gamma_name = None
    gmul = _single_consumer(out, "Mul")
    if gmul is not None:
        gamma = _other(gmul, out)
        arr = const_array(gamma)
        if gamma is not None and arr is not None and arr.ndim == 1:
            gamma_name = gamma.name
            nodes.append(gmul)
            out = gmul.outputs[0]
    assert x is not None
    return Norm(x.name, out.name, gamma_name, float(eps), tuple(n.name for n in nodes))


def _fused_norm(node: ir.Node) -> Norm | None:
    if node.op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
        eps_attr = node.attributes.get("epsilon")
        eps = float(eps_attr.value) if eps_attr is not None else 1e-5
        return Norm(node.inputs[0].name, node.outputs[0].name, node.inputs[1].name, eps, (node.name,), kind="fused")
    return None


def find_norms(g: _Graph) -> tuple[dict[str, Norm], list[str]]:
    """Norms keyed by the value they read, plus near-miss explanations."""
    norms: dict[str, Norm] = {}
    misses: list[str] = []
    for node in g.graph:
        if node.op_type == "ReduceMean":
            found = match_rms_norm(node)
            if isinstance(found, Norm):
                norms[found.input] = found
            else:
                misses.append(f"{node.name}: {found}")
        elif node.op_type == "LayerNormalization":
            misses.append(f"{node.name}: LayerNormalization, not an RMSNorm")
        else:
            fused = _fused_norm(node)
            if fused is not None:
                norms[fused.input] = fused
    return norms, misses


def as_linear(node: ir.Node) -> Linear | None:
    """The node as a linear layer with a constant weight, if it is one."""
    if node.op_type == "MatMul":
        a, b = node.inputs[0], node.inputs[1]
        if a is None or b is None or is_const(a):
            return None
        transposed = False
        via = None
        weight = b
        if not is_const(b):
            prod = b.producer()
            if prod is None or prod.op_type != "Transpose" or not is_const(prod.inputs[0]):
                return None
            perm = prod.attributes.get("perm")
            if perm is not None and list(perm.value) != [1, 0]:
                return None
            weight, transposed, via = prod.inputs[0], True, prod.name
        arr_shape = weight.shape
        if arr_shape is None or len(arr_shape) != 2:
            return None
        out = node.outputs[0]
        bias = bias_node = None
        add = _single_consumer(out, "Add")
        if add is not None:
            other = _other(add, out)
            if other is not None and is_const(other) and other.shape is not None and len(other.shape) == 1:
                bias, bias_node, out = other.name, add.name, add.outputs[0]
        return Linear(node.name, a.name, out.name, weight.name, transposed, via, bias, bias_node)
    if node.op_type == "Gemm":
        b = node.inputs[1]
        if b is None or not is_const(b):
            return None
        trans_b = node.attributes.get("transB")
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return Linear(
            node.name,
            node.inputs[0].name,
            node.outputs[0].name,
            b.name,
            bool(trans_b.value) if trans_b else False,
            None,
            c.name if c is not None else None,
            None,
        )
    return None


def _is_dynamic_matmul(node: ir.Node) -> bool:
    return (
        node.op_type == "MatMul"
        and not any(is_const(v) for v in node.inputs if v is not None)
        and (
            node.inputs[1] is not None
            and (
                node.inputs[1].producer() is None
                or node.inputs[1].producer().op_type != "Transpose"
                or not is_const(node.inputs[1].producer().inputs[0])
            )
        )
    )


def forward_region(g: _Graph, start: str, stop: set[str]) -> list[ir.Node]:
    """Nodes reachable from value ``start`` without passing through nodes named in ``stop``."""
    seen: dict[str, ir.Node] = {}
    queue = deque([start])
    while queue:
        value = queue.popleft()
        for node in g.consumers(value):
            if node.name in seen or node.name in stop:
                continue
            seen[node.name] = node
            queue.extend(o.name for o in node.outputs)
    return list(seen.values())


def _reaches(g: _Graph, start: str, limit: int = 64) -> list[tuple[ir.Node, int]]:
    """Dynamic MatMuls (and input slots) reached from ``start`` before any other MatMul or Softmax."""
    hits: list[tuple[ir.Node, int]] = []
    seen: set[str] = set()
    queue = deque([start])
    steps = 0
    while queue and steps < limit * 8:
        value = queue.popleft()
        for node in g.consumers(value):
            steps += 1
            if _is_dynamic_matmul(node):
                for i, v in enumerate(node.inputs):
                    if v is not None and v.name == value:
                        hits.append((node, i))
                continue
            online = bool(node.metadata_props.get("onnxq.online_rotation"))
            if (node.op_type in ("MatMul", "Gemm", "Softmax") and not online) or node.name in seen:
                continue
            seen.add(node.name)
            queue.extend(o.name for o in node.outputs)
    return hits


def _head_dim(g: _Graph, lin: Linear) -> int | None:
    """The last dim of the first Reshape after a projection, i.e. its head size."""
    for node in forward_region(g, lin.value, set())[:8]:
        if node.op_type == "Reshape":
            shape = const_array(node.inputs[1])
            if shape is not None and shape.size >= 3 and int(shape[-1]) > 0:
                return int(shape[-1])
    return None


def _out_features(g: _Graph, lin: Linear) -> int:
    w = g.values[lin.weight]
    assert w.shape is not None
    dims = [int(d) for d in w.shape]
    return dims[0] if lin.transposed else dims[1]


def _residual_add(g: _Graph, stream: str, norm: Norm) -> ir.Node | None:
    norm_nodes = set(norm.nodes)
    adds = [n for n in g.consumers(stream) if n.op_type == "Add" and n.name not in norm_nodes]
    return adds[0] if len(adds) == 1 else None


def _linear_feeding(value: ir.Value, linears: dict[str, Linear]) -> Linear | None:
    node = value.producer()
    for _ in range(4):
        if node is None:
            return None
        for lin in linears.values():
            if lin.output == node.outputs[0].name or lin.node == node.name:
                return lin
        if node.metadata_props.get(SPLIT_KEY) == "sum":  # the main path is the block's linear
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
            continue
        if node.op_type in DATA_MOVEMENT:
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
            continue
        return None
    return None


def _attention(g: _Graph, readers: list[Linear], o_proj: Linear, layer: int) -> Attention:
    slots: dict[str, list[tuple[ir.Node, int]]] = {r.node: _reaches(g, r.value) for r in readers}
    qk = av = None
    q = k = v = None
    for r in readers:
        for node, idx in slots[r.node]:
            succ = forward_region(g, node.outputs[0].name, set())
            if any(s.op_type == "Softmax" for s in succ[:6]):
                if idx == 0:
                    q, qk = r, node
                else:
                    k = r
            elif idx == 1:
                v, av = r, node
    if q is None or k is None or v is None or qk is None or av is None:
        raise StructureError(f"layer {layer}: could not tell q, k and v apart from what their outputs reach")
    softmax = next((n for n in forward_region(g, qk.outputs[0].name, {av.name}) if n.op_type == "Softmax"), None)
    if softmax is None:
        raise StructureError(f"layer {layer}: no Softmax between QK^T and attention x V")
    head_dim = _head_dim(g, q) or _head_dim(g, k)
    if head_dim is None:
        raise StructureError(f"layer {layer}: could not read the head size from q's Reshape")
    return Attention(
        q,
        k,
        v,
        o_proj,
        qk.name,
        av.name,
        softmax.name,
        _out_features(g, q) // head_dim,
        _out_features(g, k) // head_dim,
        head_dim,
    )


def _split_side(g: _Graph) -> set[str]:
    """Nodes of outlier-channel side paths (:mod:`rewrites.outliers`)."""
    return {n.name for n in g.graph if n.metadata_props.get(SPLIT_KEY) in ("side", "sum")}


def _mlp(g: _Graph, readers: list[Linear], down: Linear, layer: int) -> Mlp:
    act = None
    gate = up = None
    for r in readers:
        region = forward_region(g, r.value, {down.node})
        kinds = {n.op_type for n in region}
        if kinds & {"Sigmoid", "Erf", "Tanh", "Gelu", "FastGelu", "Relu", "QuickGelu"}:
            gate = r
            act = "silu" if "Sigmoid" in kinds else "gelu" if kinds & {"Erf", "Tanh", "Gelu", "FastGelu"} else "relu"
        else:
            up = r
    if gate is None or up is None or act is None:
        raise StructureError(f"layer {layer}: MLP has no gate with an activation and a plain up projection")
    return Mlp(gate, up, down, act, _out_features(g, up))


def discover(model: ir.Model) -> Structure:
    """Walk the residual stream and return the transformer's parts."""
    g = _Graph(model)
    norms, misses = find_norms(g)
    linears: dict[str, Linear] = {}
    for node in g.graph:
        lin = as_linear(node)
        if lin is not None and node.metadata_props.get(SPLIT_KEY) != "side":
            linears[lin.node] = lin
    embeds = [
        n
        for n in g.graph
        if n.op_type == "Gather" and is_const(n.inputs[0]) and n.inputs[1] is not None and n.inputs[1].is_graph_input()
    ]
    if len(embeds) > 1:  # a step graph also gathers RoPE rows by position_ids: the token table reads input_ids
        embeds = [n for n in embeds if n.inputs[1] is not None and n.inputs[1].name == "input_ids"]
    if len(embeds) != 1:
        raise StructureError(f"expected one embedding Gather reading the token ids, found {len(embeds)}")
    embed = embeds[0]
    table = embed.inputs[0]
    assert table is not None and table.shape is not None
    hidden = int(table.shape[1])
    stream = embed.outputs[0].name
    blocks: list[tuple[str, Norm, list[Linear], ir.Node]] = []
    while True:
        norm = norms.get(stream)
        if norm is None:
            why = "; ".join(misses[:3]) or "no ReduceMean reads it"
            raise StructureError(f"no RMSNorm reads the residual stream {stream!r} ({why})")
        readers = [lin for lin in linears.values() if lin.input == norm.output]
        add = _residual_add(g, stream, norm)
        if add is None:
            if len(readers) != 1:
                raise StructureError(f"the final norm feeds {len(readers)} linears, expected the lm_head alone")
            lm_head = readers[0]
            break
        blocks.append((stream, norm, readers, add))
        stream = add.outputs[0].name
    if len(blocks) % 2:
        raise StructureError(f"found {len(blocks)} residual blocks, expected attention/MLP pairs")
    layers = []
    for i in range(0, len(blocks), 2):
        index = i // 2
        _, a_norm, a_readers, a_add = blocks[i]
        _, m_norm, m_readers, m_add = blocks[i + 1]
        if len(a_readers) != 3:
            raise StructureError(f"layer {index}: attention norm feeds {len(a_readers)} linears, expected q, k, v")
        if len(m_readers) != 2:
            raise StructureError(f"layer {index}: MLP norm feeds {len(m_readers)} linears, expected gate and up")
        o_proj = _block_output(g, a_add, a_norm, linears, index, "o_proj")
        down = _block_output(g, m_add, m_norm, linears, index, "down_proj")
        layers.append(
            Layer(
                index,
                a_norm,
                _attention(g, a_readers, o_proj, index),
                a_add.name,
                m_norm,
                _mlp(g, m_readers, down, index),
                m_add.name,
            )
        )
    if not layers:
        raise StructureError("no decoder layers between the embedding and the final norm")
    lm_weight = lm_head.weight
    tied = lm_weight == table.name
    return Structure(embed.name, table.name, tuple(layers), norm, lm_head, hidden, tied)


def _block_output(g: _Graph, add: ir.Node, norm: Norm, linears: dict[str, Linear], layer: int, what: str) -> Linear:
    stream = g.values[norm.input]
    other = _other(add, stream)
    lin = _linear_feeding(other, linears) if other is not None else None
    if lin is None:
        raise StructureError(f"layer {layer}: the residual Add is not fed by a linear ({what})")
    return lin


# --------------------------------------------------------------------------- tensor roles
@dataclass(frozen=True)
class Role:
    """What an activation is: a kind from :data:`ROLE_KINDS` and its layer (None outside layers)."""

    kind: str
    layer: int | None = None

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}@{self.layer}"


ROLE_KINDS = (
    "embed",
    "residual",
    "norm",
    "attn_in",
    "q",
    "k",
    "v",
    "rope",
    "scores",
    "softmax_in",
    "probs",
    "attn_out",
    "o_out",
    "mlp_in",
    "gate",
    "up",
    "act",
    "down_in",
    "down_out",
    "outliers",
    "head_in",
    "logits",
    "other",
)


def _compute_source(value: ir.Value | None) -> ir.Value | None:
    """Walk back through data movement to the value a computing op produced."""
    while value is not None:
        producer = value.producer()
        if producer is None or producer.op_type not in DATA_MOVEMENT:
            return value
        if producer.op_type == "Concat":  # a KV cache: the new entries after the cache input
            computed = [v for v in producer.inputs if v is not None and v.producer() is not None]
            if len(computed) != 1:
                return value
            value = computed[0]
            continue
        value = producer.inputs[0]
    return None


def tensor_roles(model: ir.Model, structure: Structure) -> dict[str, Role]:
    """Label the float output of every node with its :class:`Role`."""
    g = _Graph(model)
    roles: dict[str, Role] = {}

    def mark(nodes: Iterable[ir.Node], kind: str, layer: int | None) -> None:
        for node in nodes:
            for out in node.outputs:
                roles.setdefault(out.name, Role(kind, layer))

    def mark_value(name: str, kind: str, layer: int | None) -> None:
        roles[name] = Role(kind, layer)

    def mark_norm(norm: Norm, out_kind: str, layer: int | None) -> None:
        for name in norm.nodes:
            for out in g.nodes[name].outputs:
                roles[out.name] = Role("norm", layer)
        roles[norm.output] = Role(out_kind, layer)

    mark_value(g.nodes[structure.embed_node].outputs[0].name, "embed", None)
    side = _split_side(g)
    for layer in structure.layers:
        i = layer.index
        a, m = layer.attn, layer.mlp
        mark_norm(layer.attn_norm, "attn_in", i)
        mark_norm(layer.mlp_norm, "mlp_in", i)
        for lin, kind in (
            (a.q, "q"),
            (a.k, "k"),
            (a.v, "v"),
            (a.o, "o_out"),
            (m.gate, "gate"),
            (m.up, "up"),
            (m.down, "down_out"),
        ):
            mark_value(g.nodes[lin.node].outputs[0].name, kind, i)
            mark_value(lin.value, kind, i)
        qk_node = g.nodes[a.qk]
        for slot, kind in ((0, "q_rope"), (1, "k_rope")):  # what QKᵀ reads, before its data movement
            source = _compute_source(qk_node.inputs[slot])
            if source is not None:
                mark_value(source.name, kind, i)
        mark(forward_region(g, a.q.value, {a.qk}), "rope", i)
        mark(forward_region(g, a.k.value, {a.qk}), "rope", i)
        mark(forward_region(g, a.v.value, {a.av}), "v", i)
        scores = forward_region(g, g.nodes[a.qk].outputs[0].name, {a.softmax})
        mark_value(g.nodes[a.qk].outputs[0].name, "scores", i)
        mark(scores, "scores", i)
        softmax = g.nodes[a.softmax]
        mark_value(softmax.inputs[0].name, "softmax_in", i)
        mark_value(softmax.outputs[0].name, "probs", i)
        mark_value(g.nodes[a.av].outputs[0].name, "attn_out", i)
        mark(forward_region(g, g.nodes[a.av].outputs[0].name, {a.o.node}), "attn_out", i)
        down_in = g.nodes[m.down.node].inputs[0]
        mark_value(down_in.name, "down_in", i)
        online = down_in.producer()
        if online is not None and online.metadata_props.get("onnxq.online_rotation"):
            mark_value(online.inputs[0].name, "act", i)  # R4 rotates the 16-bit product; down reads 8
        mark(forward_region(g, m.gate.value, {m.down.node}), "act", i)
        for name in side:  # the outlier channels' 16-bit path (rewrites.outliers) inside this MLP
            node = g.nodes[name]
            if node.name.startswith(f"{m.down.node}/"):
                for out in node.outputs:
                    mark_value(out.name, "outliers", i)
        mark_value(g.nodes[layer.attn_residual].outputs[0].name, "residual", i)
        mark_value(g.nodes[layer.mlp_residual].outputs[0].name, "residual", i)
    mark_norm(structure.final_norm, "head_in", None)
    mark_value(g.nodes[structure.lm_head.node].outputs[0].name, "logits", None)
    mark_value(structure.lm_head.value, "logits", None)
    for node in g.graph:
        for out in node.outputs:
            roles.setdefault(out.name, Role("other", None))
    return roles


def generic_roles(model: ir.Model) -> dict[str, Role]:
    """Roles from op types alone, for graphs whose transformer structure was not recognised.

    Inputs of MatMuls get MatMul-input roles (the ones a preset may put at 8 bits); everything else
    is ``other`` and stays at 16 bits.
    """
    roles: dict[str, Role] = {}
    for node in model.graph:
        if node.op_type == "Softmax":
            roles[node.inputs[0].name] = Role("softmax_in")
            roles[node.outputs[0].name] = Role("probs")
        elif as_linear(node) is not None:
            roles.setdefault(node.inputs[0].name, Role("mlp_in"))
            roles[node.outputs[0].name] = Role("up")
    for node in model.graph:
        for out in node.outputs:
            roles.setdefault(out.name, Role("other"))
    return roles
