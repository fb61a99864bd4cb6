"""Split a QDQ graph into consecutive parts at decoder-layer boundaries, and run the parts in sequence.

The HTP allocates a context in pieces of under about 2 GB, so a model whose weights exceed that is
compiled as several context binaries. A cut sits between the QuantizeLinear of the residual stream
and its DequantizeLinear: a part hands the next one the stream's 16-bit integer codes, so the parts
compute exactly what the whole graph computes. Each part takes the graph inputs it reads (token ids,
positions, mask, its layers' cache) and writes its layers' ``present_*`` outputs.

A split graph is a manifest, ``<graph>.parts.json`` (:func:`onnxq.core.steps.write_parts`), naming
its parts in order.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.core.errors import OnnxqError
from onnxq.core.steps import PARTS_SUFFIX, read_parts

#: Default limit on a context part: the HTP allocates a context in pieces of under about 2 GB.
DEFAULT_MAX_PART_MB = 1800
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class Part:
    """Decoder layers ``first..last-1`` (the first part also embeds, the last also scores)."""

    first: int
    last: int
    weight_bytes: int


def layer_cuts(model: onnx.ModelProto, base_dir: str | Path = "") -> list[str]:
    """For each layer after the first, the codes tensor of the residual stream that enters it.
    ``base_dir``: where the model's external data lies (the few constants the structure is read from)."""
    import onnx_ir as ir

    from rewrites.qdq_view import strip_qdq
    from rewrites.structure import StructureError, discover

    view = ir.serde.deserialize_model(model)
    ir.external_data.set_base_dir(view.graph, base_dir)
    strip_qdq(view)
    try:
        structure = discover(view)
    except StructureError as exc:
        raise OnnxqError(f"cannot split this graph into parts: {exc.problem}", "compile it whole (--parts 1)") from None
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {n.name: n.output[0] for n in model.graph.node if n.output}
    cuts = []
    for layer in structure.layers[:-1]:
        stream = outputs[layer.mlp_residual]  # the Add that closes the layer
        quantizers = [n for n in consumers.get(stream, []) if n.op_type == "QuantizeLinear"]
        if len(quantizers) != 1:
            raise OnnxqError(
                f"layer {layer.index}'s residual stream is not quantized once", "split a graph from onnxq quantize"
            )
        cuts.append(quantizers[0].output[0])
    return cuts


def layer_bytes(model: onnx.ModelProto) -> tuple[list[int], int, int]:
    """Initializer bytes per decoder layer (by the ``layers.N.`` in their names), plus those of the
    embedding (before the first layer) and of everything else (after the last)."""
    per_layer: dict[int, int] = {}
    head = tail = 0
    for init in model.graph.initializer:
        size = _nbytes(init)
        match = _LAYER.search(init.name)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + size
        elif "embed" in init.name:
            head += size
        else:
            tail += size
    return [per_layer.get(i, 0) for i in range(max(per_layer, default=-1) + 1)], head, tail


def _nbytes(init: onnx.TensorProto) -> int:
    count = int(np.prod(init.dims)) if init.dims else 1
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(init.data_type)
    if bits is not None:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def plan_parts(per_layer: Sequence[int], head: int, tail: int, max_bytes: int, parts: int | None = None) -> list[Part]:
    """Consecutive layer ranges: ``parts`` of them with about equal weights, or as few as fit ``max_bytes``."""
    sizes = list(per_layer)
    sizes[0] += head
    sizes[-1] += tail
    if parts is not None:
        if not 1 <= parts <= len(sizes):
            raise OnnxqError(f"--parts {parts}: this model has {len(sizes)} layers", f"pass 1 to {len(sizes)}")
        total = sum(sizes)
        bounds = [0]
        running = 0
        for i, size in enumerate(sizes[:-1]):
            running += size
            want = total * len(bounds) / parts
            left = len(sizes) - (i + 1)
            if (running >= want or left == parts - len(bounds)) and len(bounds) < parts:
                bounds.append(i + 1)
        bounds.append(len(sizes))
    else:
        for i, size in enumerate(sizes):
            if size > max_bytes:
                raise OnnxqError(
                    f"layer {i} holds {size / 2**20:.0f} MB of weights, over the {max_bytes / 2**20:.0f} MB limit of "
                    "a context part",
                    "raise --max-part-mb (the HTP allocates a context in pieces of under about 2 GB)",
                )
        bounds = [0]
        running = 0
        for i, size in enumerate(sizes):
            if running + size > max_bytes:
                bounds.append(i)
                running = 0
            running += size
        bounds.append(len(sizes))
    return [Part(a, b, sum(sizes[a:b])) for a, b in itertools.pairwise(bounds)]


def split_graph(model: onnx.ModelProto, parts: Sequence[Part], base_dir: str | Path = "") -> list[onnx.ModelProto]:
    """The graph's parts, each a model whose inputs are the graph inputs it reads and the stream it is handed.
    Weights in external data stay there (``base_dir``), for each part to read when it is written."""
    cuts = layer_cuts(model, base_dir)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    types = {v.name: v for v in [*graph.value_info, *graph.output]}
    order = {id(n): i for i, n in enumerate(graph.node)}
    out: list[onnx.ModelProto] = []
    for index, part in enumerate(parts):
        given = cuts[part.first - 1] if part.first > 0 else None
        wanted = [o.name for o in graph.output if _layer_of(o.name) in range(part.first, part.last)]
        if part.last < len(cuts) + 1:
            wanted.append(cuts[part.last - 1])
        else:
            wanted = [o.name for o in graph.output if _layer_of(o.name) is None] + wanted
        nodes: set[int] = set()
        reads: set[str] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name == given or name in inits or name in graph_inputs or name == "" or name in reads:
                reads.add(name)
                continue
            reads.add(name)
            node = producer[name]
            if id(node) not in nodes:
                nodes.add(id(node))
                stack.extend(node.input)
        kept = sorted((n for n in graph.node if id(n) in nodes), key=lambda n: order[id(n)])
        inputs = [graph_inputs[n] for n in graph_inputs if n in reads]
        if given is not None:
            inputs.insert(0, _value_info(given, producer[given], types, inits))
        outputs = [types[n] if n in types else _value_info(n, producer[n], types, inits) for n in wanted]
        sub = onnx.helper.make_graph(
            kept, f"{graph.name}_part{index}", inputs, outputs, [inits[n] for n in inits if n in reads]
        )
        proto = onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        for prop in model.metadata_props:
            proto.metadata_props.add(key=prop.key, value=prop.value)
        where = f"{index} of {len(parts)}: layers {part.first}-{part.last - 1}"
        proto.metadata_props.add(key="onnxq.part", value=where)
        out.append(proto)
    return out


def _layer_of(output: str) -> int | None:
    """The layer a graph output belongs to (``present_key_3`` -> 3), or None (``logits``)."""
    match = re.fullmatch(r"present_(?:key|value)_(\d+)", output)
    return int(match.group(1)) if match else None


def _value_info(
    name: str, node: onnx.NodeProto, types: dict[str, onnx.ValueInfoProto], inits: dict[str, onnx.TensorProto]
) -> onnx.ValueInfoProto:
    """A cut's type: the codes of a QuantizeLinear, shaped like what it quantizes."""
    if name in types:
        return types[name]
    assert node.op_type == "QuantizeLinear", name
    dtype = inits[node.input[2]].data_type
    source = types.get(node.input[0])
    shape = [d.dim_value for d in source.type.tensor_type.shape.dim] if source is not None else None
    return onnx.helper.make_tensor_value_info(name, dtype, shape)


class PartedSession:
    """The parts of a split graph run one after another, as one session: each takes what it reads from the
    caller's feeds and the previous parts' outputs; the outputs are every part's graph outputs."""

    def __init__(self, manifest: Path, make_session: Callable[[Path], Any]) -> None:
        self.sessions = [make_session(f) for f in read_parts(manifest)]
        handed = {s.get_outputs()[-1].name for s in self.sessions[:-1]}
        self._outputs = [o for s in self.sessions for o in s.get_outputs() if o.name not in handed]
        self._inputs = list({i.name: i for s in self.sessions for i in s.get_inputs() if i.name not in handed}.values())

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self._outputs

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        values = dict(feeds)
        for sess in self.sessions:
            outs = sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})
            values.update(zip((o.name for o in sess.get_outputs()), outs, strict=True))
        return [values[n] for n in (names or [o.name for o in self._outputs])]


def open_graph(path: Path, ep: str = "cpu", **qnn_options: Any) -> Any:
    """A session on a graph, or on the parts of a split one, in sequence."""
    from onnxq.device.qnn import make_session

    if not path.name.endswith(PARTS_SUFFIX):
        return make_session(path, ep, **qnn_options)
    if ep != "qnn" and any(p.name.endswith("_ctx.onnx") for p in read_parts(path)):
        raise OnnxqError(f"{path.parent} is compiled for the HTP", "run it with --ep qnn")
    return PartedSession(path, lambda part: make_session(part, ep, **qnn_options))
