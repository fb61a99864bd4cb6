"""ONNX IR helpers shared by every stage: loading with clear errors, atomic saving, small queries.

onnxq works on :mod:`onnx_ir` models: values know their producer and consumers, initializers are
values with a constant attached, and tensors stay lazy until read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxq.core.errors import OnnxqError

#: Opsets a quantized model may use: 21 brings int4/int16 QuantizeLinear and blocked DQ;
#: QAIRT's converter reads ONNX up to opset 22.
MIN_OPSET = 21
MAX_OPSET = 22
#: Models whose weights exceed this go to a ``.data`` file next to the graph (protobuf caps at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model, turning the usual mistakes into one-line errors."""
    path = _model_file(path)
    try:
        model = ir.load(path)
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise _not_onnx(path, exc) from None
    if len(model.graph) == 0:
        raise OnnxqError(f"{path} is not an ONNX model (no nodes)", "pass the exported .onnx file")
    external = [v.const_value for v in model.graph.initializers.values()]
    _check_external(path, [(t.location, t.offset or 0, t.length) for t in external if isinstance(t, ir.ExternalTensor)])
    _own_tensors(model)
    return model


def read_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph of an ONNX model without its weights, after the checks :func:`load` makes: for a
    command that hands the file to ONNX Runtime, so that a user's mistake is one line, not its error."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = _model_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise _not_onnx(path, exc) from None
    if not proto.graph.node:
        raise OnnxqError(f"{path} is not an ONNX model (no nodes)", "pass the exported .onnx file")
    infos = [ExternalDataInfo(t) for t in proto.graph.initializer if uses_external_data(t)]
    _check_external(path, [(i.location, i.offset or 0, i.length or None) for i in infos])
    return proto


def _model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise OnnxqError(f"{path} does not exist", "check the path")
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        hint = f"pass one of: {', '.join(c.name for c in candidates[:4])}" if candidates else "pass an .onnx file"
        raise OnnxqError(f"{path} is a folder, not an ONNX model", hint)
    return path


def _not_onnx(path: Path, exc: Exception) -> OnnxqError:
    return OnnxqError(
        f"{path} is not an ONNX model ({type(exc).__name__})",
        "pass the .onnx file written by `onnxq export`, optimum or torch.onnx.export",
    )


def _check_external(path: Path, entries: Iterable[tuple[str, int, int | None]]) -> None:
    """Refuse a model whose weights file (ONNX external data) is missing or shorter than the model reads."""
    sizes: dict[str, int] = {}
    for location, offset, length in entries:
        file = path.parent / location
        if location not in sizes:
            if not file.is_file():
                raise OnnxqError(
                    f"{path} keeps its weights in {location}, which is not beside it",
                    f"copy {location} into {path.parent} with the model",
                )
            sizes[location] = file.stat().st_size
        end = offset + (length or 0)
        if sizes[location] < end:
            raise OnnxqError(
                f"{file} is truncated: {sizes[location]:,} bytes, and the model reads up to byte {end:,}",
                f"copy {location} again, whole",
            )


def _own_tensors(model: ir.Model) -> None:
    """Copy weights stored inside the protobuf out of it.

    A tensor read from the protobuf is a view of the whole parsed file: while any one is referenced,
    every weight in the file stays in memory, so each weight a rewrite replaces would be held twice.
    Weights in external data are memory-mapped and released one by one; they stay as they are.
    """

    def owned(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        if not isinstance(tensor, ir.TensorProtoTensor) or tensor.dtype == ir.DataType.STRING:
            return tensor
        return ir.Tensor(np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name)

    for value in model.graph.initializers.values():
        if value.const_value is not None:
            value.const_value = owned(value.const_value)
    for node in model.graph.all_nodes():
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR:
                node.attributes[name] = ir.AttrTensor(name, owned(attr.as_tensor()))


def save(model: ir.Model, path: str | os.PathLike) -> list[Path]:
    """Save atomically; weights go to ``<name>.data`` when the model is too large for one protobuf.

    Returns the files written. The graph file is moved into place last, so a reader never sees a
    graph that points at a half-written data file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = weight_bytes(model) > EXTERNAL_DATA_BYTES
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        written = [path]
        if external:
            data_name = f"{path.name}.data"
            ir.save(model, tmpdir / path.name, external_data=data_name)
            os.replace(tmpdir / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        else:
            ir.save(model, tmpdir / path.name)
        os.replace(tmpdir / path.name, path)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def opset(model: ir.Model) -> int:
    """The default-domain opset version of the model."""
    return int(model.opset_imports.get("", 0))


def require_opset(model: ir.Model, where: str) -> ir.Model:
    """Bring the model to an opset the HTP path accepts, or refuse with the fix.

    Older float graphs (optimum exports opset 14-18) are upgraded with ONNX's version converter;
    newer ones (23+, e.g. with fused RMSNormalization) cannot go through QAIRT's converter.
    """
    version = opset(model)
    if MIN_OPSET <= version <= MAX_OPSET:
        return model
    if version > MAX_OPSET:
        raise OnnxqError(
            f"{where} uses opset {version}; QAIRT's converter accepts ONNX up to opset {MAX_OPSET}",
            f"re-export with opset {MIN_OPSET} (onnxq export does)",
        )
    if version < 14:
        raise OnnxqError(
            f"{where} uses opset {version}, too old to upgrade reliably",
            f"re-export with opset {MIN_OPSET} (onnxq export does)",
        )
    proto = ir.to_proto(model)
    try:
        upgraded = onnx.version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise OnnxqError(
            f"{where} uses opset {version} and could not be upgraded to {MIN_OPSET} ({exc})",
            f"re-export with opset {MIN_OPSET} (onnxq export does)",
        ) from None
    return ir.from_proto(upgraded)


def require_static(model: ir.Model, where: str) -> dict[str, tuple[int, ...]]:
    """Return the input shapes, refusing symbolic dimensions: every HTP scale is fixed offline."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            raise OnnxqError(f"{where}: input {value.name!r} has no shape", "re-export with static shapes")
        dims = list(value.shape)
        if not all(isinstance(d, int) for d in dims):
            named = ", ".join(str(d) for d in dims)
            raise OnnxqError(
                f"{where}: input {value.name!r} has dynamic shape [{named}]; the HTP needs static shapes",
                "re-export with `onnxq export --seq-len N`, or pass --seq-len N to fix the dimensions",
            )
        shapes[value.name or ""] = tuple(int(d) for d in dims)
    return shapes


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_const(value: ir.Value | None) -> bool:
    """Whether a value is known at export time."""
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer with a name not yet used in the graph."""
    name = unique_name(graph, name)
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_N`` for the first N that no value or initializer in the graph uses."""
    taken = graph.meta.setdefault("onnxq.names", None)
    if taken is None:
        taken = {v.name for v in iter_values(graph) if v.name}
        graph.meta["onnxq.names"] = taken
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def iter_values(graph: ir.Graph) -> Iterator[ir.Value]:
    """Every value of the graph once: inputs, initializers, node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def ensure_names(model: ir.Model) -> ir.Model:
    """Give every node and value a unique name, which precision maps and reports key on."""
    graph = model.graph
    seen: set[str] = set()
    for value in iter_values(graph):
        if not value.name or value.name in seen:
            base = value.name or "v"
            n = 0
            while f"{base}_{n}" in seen:
                n += 1
            if value.is_initializer():
                # Initializer names are dict keys in the graph; re-register under the new name.
                graph.initializers.pop(value.name, None)
                value.name = f"{base}_{n}"
                graph.initializers[value.name] = value
            else:
                value.name = f"{base}_{n}"
        seen.add(value.name)
    node_seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in node_seen:
            node.name = f"{node.op_type}_{i}"
        node_seen.add(node.name)
    graph.meta.pop("onnxq.names", None)
    return model


def float_consumers(value: ir.Value) -> Iterable[tuple[ir.Node, int]]:
    """(node, input index) for each use of ``value``."""
    return [(use.node, use.idx) for use in value.uses()]


def metadata(model: ir.Model) -> dict[str, str]:
    """onnxq's own metadata entries (``onnxq.*``) of the model."""
    return {k: v for k, v in model.metadata_props.items() if k.startswith("onnxq.")}


def take_over(graph: ir.Graph, old: ir.Value, new: ir.Value, *, suffix: str, keep: ir.Node | None = None) -> None:
    """Make ``new`` stand where ``old`` stood: its readers (but ``keep``) and, under the same name, its
    place among the graph outputs (``old`` is renamed with ``suffix``), so users' names keep working."""
    for use in [u for u in old.uses() if u.node is not keep]:
        use.node.replace_input_with(use.idx, new)
    if old.is_graph_output():
        i = list(graph.outputs).index(old)
        name = old.name
        old.name = unique_name(graph, f"{name}{suffix}")
        new.name = name
        graph.outputs[i] = new
