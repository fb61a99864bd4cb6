"""``onnxq check``: static checks of a QDQ model before it goes to the device.

Each rule looks at the graph (and optionally an encodings file) and returns findings: one line
each, naming the tensor and the fix. The rules encode what the QNN EP's HTP backend rejects or
computes wrongly, as measured on this toolchain (see README, "What the HTP accepts").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import const_array
from rewrites.structure import DATA_MOVEMENT

QDQ = ("QuantizeLinear", "DequantizeLinear")
FLOAT = ir.DataType.FLOAT
#: a per-tensor range wider than this is almost surely spent on a constant such as a -3.4e38 mask
HUGE_RANGE = 1e6


@dataclass(frozen=True)
class Finding:
    rule: str
    tensor: str
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.rule}: {self.tensor}: {self.problem}; fix: {self.fix}"


Rule = Callable[[ir.Graph], Iterator[Finding]]
RULES: dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return register


def _scale(node: ir.Node) -> np.ndarray | None:
    return const_array(node.inputs[1]) if len(node.inputs) > 1 else None


def _zero(node: ir.Node) -> np.ndarray | None:
    return const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None


def _qtype(node: ir.Node) -> ir.DataType | None:
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is None:
        return None
    if zp.dtype is None and zp.const_value is not None:
        return zp.const_value.dtype
    return zp.dtype


def _dq_of(value: ir.Value | None) -> ir.Node | None:
    producer = value.producer() if value is not None else None
    return producer if producer is not None and producer.op_type == "DequantizeLinear" else None


def _q_after(value: ir.Value) -> ir.Node | None:
    for use in value.uses():
        if use.node.op_type == "QuantizeLinear":
            return use.node
    return None


@rule("unquantized")
def unquantized_tensor(graph: ir.Graph) -> Iterator[Finding]:
    """A float tensor read by a compute op that is not the output of a DequantizeLinear."""
    for node in graph:
        if node.op_type in QDQ:
            continue
        for value in node.inputs:
            if value is None or value.dtype != FLOAT or _dq_of(value) is not None:
                continue
            what = "a float constant" if value.const_value is not None else "a float activation"
            yield Finding(
                "unquantized",
                value.name or "?",
                f"{what} reaches {node.op_type} {node.name!r} without quantization",
                "quantize it (onnxq quantize inserts Q/DQ for every tensor)",
            )


@rule("float-int-matmul")
def mixed_matmul(graph: ir.Graph) -> Iterator[Finding]:
    for node in graph:
        if node.op_type != "MatMul":
            continue
        quantized = [_dq_of(v) is not None for v in node.inputs[:2]]
        if any(quantized) and not all(quantized):
            yield Finding(
                "float-int-matmul",
                node.name,
                "MatMul between a quantized and a float input",
                "quantize both inputs; the HTP runs integer MatMuls only",
            )


@rule("qdq-mismatch")
def qdq_pair_mismatch(graph: ir.Graph) -> Iterator[Finding]:
    for node in graph:
        if node.op_type != "QuantizeLinear":
            continue
        for use in node.outputs[0].uses():
            dq = use.node
            if dq.op_type != "DequantizeLinear":
                continue
            s1, s2, z1, z2 = _scale(node), _scale(dq), _zero(node), _zero(dq)
            if s1 is None or s2 is None or not np.array_equal(s1, s2) or not np.array_equal(z1, z2):
                yield Finding(
                    "qdq-mismatch",
                    node.inputs[0].name,
                    "QuantizeLinear and its DequantizeLinear use different scales or zero points",
                    "give the pair one scale and zero point",
                )


@rule("shared-scale")
def movement_changes_scale(graph: ir.Graph) -> Iterator[Finding]:
    """Data movement (and Concat) must keep its input's encoding on the HTP."""
    for node in graph:
        if node.op_type not in DATA_MOVEMENT or node.op_type == "Gather":
            continue
        out_q = _q_after(node.outputs[0]) if node.outputs else None
        if out_q is None:
            continue
        inputs = node.inputs if node.op_type == "Concat" else node.inputs[:1]
        for value in inputs:
            dq = _dq_of(value)
            if dq is None or value is None or value.dtype != FLOAT:
                continue
            same = np.array_equal(_scale(dq), _scale(out_q)) and np.array_equal(_zero(dq), _zero(out_q))
            if not same or _qtype(dq) != _qtype(out_q):
                yield Finding(
                    "shared-scale",
                    node.outputs[0].name,
                    f"{node.op_type} changes the encoding of {value.name}",
                    "use the input's scale and zero point for the output",
                )


@rule("huge-range")
def huge_range(graph: ir.Graph) -> Iterator[Finding]:
    """A per-tensor range so wide that ordinary values all round to a few steps."""
    for node in graph:
        if node.op_type != "QuantizeLinear":
            continue
        scale = _scale(node)
        qtype = _qtype(node)
        if scale is None or qtype is None or scale.size > 1:
            continue
        step = float(scale.reshape(-1)[0])
        span = step * _levels(qtype)
        if span <= HUGE_RANGE:
            continue
        if _from_squares(node.inputs[0]):
            why, fix = "the square of massive activations in a decomposed RMSNorm", "fuse the RMSNorm (onnxq does)"
        else:
            why, fix = "a huge value such as a folded -3.4e38 attention mask", "use a finite mask (onnxq does)"
        yield Finding("huge-range", node.inputs[0].name, f"range {span:.3g} (step {step:.3g}) is spent on {why}", fix)


def _from_squares(value: ir.Value | None, depth: int = 10) -> bool:
    """Whether ``value`` is computed from x² within a few ops (through Q/DQ): inside a decomposed norm."""
    for _ in range(depth):
        producer = value.producer() if value is not None else None
        if producer is None:
            return False
        if producer.op_type == "Pow" or (producer.op_type == "Mul" and producer.inputs[0] is producer.inputs[1]):
            return True
        value = producer.inputs[0]
    return False


@rule("bad-range")
def bad_range(graph: ir.Graph) -> Iterator[Finding]:
    for node in graph:
        if node.op_type not in QDQ:
            continue
        scale = _scale(node)
        if scale is None:
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            yield Finding(
                "bad-range",
                node.inputs[0].name,
                "scale is zero, negative, NaN or inf",
                "recalibrate on data that reaches this tensor (or check the float model for NaN)",
            )


@rule("width-meets")
def widths_meet(graph: ir.Graph) -> Iterator[Finding]:
    """A per-channel FC whose input and output widths differ; the HTP has no such kernel."""
    for node in graph:
        if node.op_type != "MatMul":
            continue
        w_dq = _dq_of(node.inputs[1])
        x_dq = _dq_of(node.inputs[0])
        out_q = _q_after(node.outputs[0])
        if w_dq is None or x_dq is None or out_q is None or not w_dq.inputs[0].is_initializer():
            continue
        scale = _scale(w_dq)
        lpbq = w_dq.attributes.get_int("block_size", 0) > 0  # block scales computed by another DQ
        per_channel = lpbq or (scale is not None and scale.size > 1)
        bits_in, bits_out = _bits(_qtype(x_dq)), _bits(_qtype(out_q))
        if per_channel and bits_in != bits_out:
            yield Finding(
                "width-meets",
                node.name,
                f"per-channel FC reads {bits_in}-bit and writes {bits_out}-bit",
                "add a DequantizeLinear->QuantizeLinear convert so it runs at one width",
            )
        if per_channel and bits_in == 8 and _bits(_qtype(w_dq)) == 8:
            weights = const_array(w_dq.inputs[0])
            if weights is not None and np.abs(weights.astype(np.int32)).max() > 63:
                yield Finding(
                    "htp-int8-range",
                    node.name,
                    "8-bit per-channel weights beyond ±63 next to an 8-bit "
                    "input: the HTP computes this FC wrongly (12 % error measured)",
                    "requantize the weights within ±63 (onnxq does)",
                )
        if _signed(_qtype(out_q)) and not _signed(_qtype(x_dq)):
            yield Finding(
                "htp-signed-fc",
                node.outputs[0].name,
                "an FC emits a signed output, which the HTP rejects",
                "quantize the FC output unsigned and convert it",
            )


@rule("htp-lpbq-read")
def lpbq_output_read(graph: ir.Graph) -> Iterator[Finding]:
    """A compute op reading an LPBQ FC's 8-bit output directly; on the HTP it reads some codes one too high."""
    for node in graph:
        w_dq = _dq_of(node.inputs[1]) if node.op_type == "MatMul" else None
        out_q = _q_after(node.outputs[0]) if w_dq is not None else None
        if out_q is None or w_dq.attributes.get_int("block_size", 0) == 0 or _bits(_qtype(out_q)) != 8:
            continue
        for reader in _readers(out_q):
            yield Finding(
                "htp-lpbq-read",
                node.outputs[0].name,
                f"{reader.op_type} {reader.name!r} reads this LPBQ FC's 8-bit output; on the HTP it sees "
                "about one value in five one step too high",
                "read it through a DequantizeLinear->QuantizeLinear convert to 16 bits (onnxq quantize does)",
            )


@rule("htp-fixed-grid")
def fixed_output_grid(graph: ir.Graph) -> Iterator[Finding]:
    """A 16-bit Sigmoid or Softmax output on another grid than the one the HTP writes it on."""
    for node in graph:
        out_q = _q_after(node.outputs[0]) if node.op_type in ("Sigmoid", "Softmax") else None
        if out_q is None or _qtype(out_q) != ir.DataType.UINT16:
            continue
        scale, zero = _scale(out_q), _zero(out_q)
        if scale is None or float(scale.reshape(-1)[0]) != 2.0**-16 or zero is None or int(zero.reshape(-1)[0]):
            yield Finding(
                "htp-fixed-grid",
                node.outputs[0].name,
                f"the HTP writes a 16-bit {node.op_type} output in steps of 1/65536 from 0, not on this encoding",
                "quantize it with scale 1/65536 and zero point 0 (onnxq quantize does)",
            )


@rule("htp-fc-width-1")
def one_wide_fc(graph: ir.Graph) -> Iterator[Finding]:
    """A one-token FC with a weight one row or one column wide: the HTP's compile of it runs away.

    A symbolic dimension counts as more than one token (a dynamic graph is not flagged)."""
    for node in graph:
        w_dq = _dq_of(node.inputs[1]) if node.op_type == "MatMul" else None
        weight = const_array(w_dq.inputs[0]) if w_dq is not None else None
        x = node.inputs[0]
        if weight is None or weight.ndim != 2 or min(weight.shape) != 1 or x is None or x.shape is None:
            continue
        if int(np.prod([d if isinstance(d, int) else 2 for d in list(x.shape)[:-1]])) == 1:
            yield Finding(
                "htp-fc-width-1",
                node.outputs[0].name,
                f"a one-token FC with a {weight.shape[0]}x{weight.shape[1]} weight: the HTP's compile of it runs "
                "away with memory",
                "give the outlier side path at least 2 channels (onnxq quantize does)",
            )


def _readers(q: ir.Node) -> Iterator[ir.Node]:
    """Compute ops that read ``q``'s codes through its DQs and any data movement (not through a convert)."""
    for dq_use in q.outputs[0].uses():
        if dq_use.node.op_type != "DequantizeLinear":
            continue
        for use in dq_use.node.outputs[0].uses():
            reader = use.node
            if reader.op_type == "QuantizeLinear":
                continue
            moved = _q_after(reader.outputs[0]) if reader.op_type in DATA_MOVEMENT else None
            if moved is not None and _qtype(moved) == _qtype(q):
                yield from _readers(moved)
            else:
                yield reader


def _bits(dtype: ir.DataType | None) -> int:
    return {ir.DataType.UINT16: 16, ir.DataType.INT16: 16, ir.DataType.INT4: 4, ir.DataType.UINT4: 4}.get(dtype, 8)  # type: ignore[arg-type]


def _signed(dtype: ir.DataType | None) -> bool:
    return dtype in (ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT4)


@rule("htp-norm")
def decomposed_norm(graph: ir.Graph) -> Iterator[Finding]:
    for node in graph:
        if node.op_type != "Reciprocal":
            continue
        dq = _dq_of(node.inputs[0])
        scale = _scale(dq) if dq is not None else None
        if scale is not None and float(scale.reshape(-1)[0]) * _levels(_qtype(dq)) < 1.0:
            yield Finding(
                "htp-norm",
                node.outputs[0].name,
                "Reciprocal of a small quantized input (a decomposed RMSNorm) is 70-90 % off on the HTP",
                "fuse the RMSNorm (onnxq quantize does)",
            )


NOT_COMPUTE = ("QuantizeLinear", "DequantizeLinear", *DATA_MOVEMENT)


@rule("htp-norm-width")
def norm_width(graph: ir.Graph) -> Iterator[Finding]:
    """An RMSNorm reading one width and writing another; the HTP's RmsNorm has no such kernel."""
    for node in graph:
        if node.op_type not in ("SimplifiedLayerNormalization", "RMSNormalization"):
            continue
        x_dq, out_q = _dq_of(node.inputs[0]), _q_after(node.outputs[0])
        if x_dq is None or out_q is None:
            continue
        bits_in, bits_out = _bits(_qtype(x_dq)), _bits(_qtype(out_q))
        if bits_in != bits_out:
            yield Finding(
                "htp-norm-width",
                node.name,
                f"RMSNorm reads {bits_in}-bit and writes {bits_out}-bit; the HTP fails to finalize such a graph",
                "read its input through a DequantizeLinear->QuantizeLinear convert to 16 bits (onnxq quantize does)",
            )


@rule("htp-coarse-widening")
def coarse_widening(graph: ir.Graph) -> Iterator[Finding]:
    """An elementwise op reading 8 bits and writing 16; the HTP computes it to about 8-bit precision."""
    for node in graph:
        if node.op_type in (*NOT_COMPUTE, "MatMul", "SimplifiedLayerNormalization", "RMSNormalization"):
            continue
        out_q = _q_after(node.outputs[0]) if node.outputs else None
        if out_q is None or _bits(_qtype(out_q)) != 16:
            continue
        for value in node.inputs:
            dq = _dq_of(value)
            if dq is not None and not dq.inputs[0].is_initializer() and _bits(_qtype(dq)) == 8:
                yield Finding(
                    "htp-coarse-widening",
                    node.name,
                    f"{node.op_type} reads the 8-bit {value.name!r} and writes 16 bits; the HTP computes it "
                    "up to 2 8-bit steps off",
                    "read it through a DequantizeLinear->QuantizeLinear convert to 16 bits (onnxq quantize does)",
                )
                break


def _levels(dtype: ir.DataType | None) -> int:
    return 65535 if _bits(dtype) == 16 else 255


@rule("htp-expand16")
def signed16_expand(graph: ir.Graph) -> Iterator[Finding]:
    for node in graph:
        if node.op_type not in ("Expand", "Tile"):
            continue
        dq = _dq_of(node.inputs[0])
        if dq is not None and _qtype(dq) == ir.DataType.INT16:
            yield Finding(
                "htp-expand16",
                node.outputs[0].name,
                f"signed 16-bit {node.op_type} is not supported by the HTP",
                "rewrite GQA without K/V repeats (onnxq quantize does)",
            )


def quantized_names(graph: ir.Graph) -> set[str]:
    """Names (as in the float graph) of every tensor the QDQ graph quantizes; converts excluded."""
    names: set[str] = set()
    for node in graph:
        if node.op_type == "QuantizeLinear":
            src = node.inputs[0]
            if src is None or _dq_of(src) is not None:
                continue  # a convert: its encoding belongs to the point it converts into
            names.add(src.name.removesuffix(".float") if src.name.endswith(".float") else src.name)
        elif node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer():
            if any(u.node.op_type == "DequantizeLinear" for u in node.outputs[0].uses()):
                continue  # LPBQ block scales: part of the weight's encoding
            names.add(node.inputs[0].name.removesuffix(".q"))
    return names


def check_encodings(graph: ir.Graph, path: Path) -> Iterator[Finding]:
    """An encodings file must cover the graph's quantized tensors and name no others."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxqError(f"cannot read encodings {path} ({type(exc).__name__})", "pass a JSON encodings file") from None
    quantized = quantized_names(graph)
    # a convert's second encoding is named "<tensor>.cvt" in AIMET files (see onnxq.stages.split)
    names = {n for n in _encoded_names(data) if not (n.endswith(".cvt") and n.removesuffix(".cvt") in quantized)}
    for name in sorted(names - quantized):
        yield Finding(
            "encodings-extra",
            name,
            "the encodings name a tensor the graph does not quantize",
            "regenerate the encodings from this model",
        )
    for name in sorted(quantized - names):
        yield Finding("encodings-missing", name, "a quantized tensor has no encoding", "regenerate the encodings")


def _encoded_names(data: object) -> set[str]:
    if isinstance(data, dict) and isinstance(data.get("points"), dict):  # onnxq's encodings.json
        return {t for entry in data["points"].values() for t in entry.get("tensors", [])}
    if isinstance(data, dict) and ("activation_encodings" in data or "param_encodings" in data):
        out: set[str] = set()
        for key in ("activation_encodings", "param_encodings"):
            section = data.get(key, {})
            if isinstance(section, dict):
                out |= set(section)
            elif isinstance(section, list):
                out |= {e["name"] for e in section if isinstance(e, dict) and "name" in e}
        return out
    raise OnnxqError("unrecognised encodings file", "pass an AIMET (0.6.1/1.0.0) or onnxq encodings.json file")


def run_checks(model: ir.Model, encodings: Path | None = None) -> list[Finding]:
    """Every rule over ``model``; findings sorted by rule.

    A graph written without value types (some exporters and hand edits) gets them inferred first:
    the rules tell float tensors from integer ones by their type. Ops that ONNX's inference does not
    know (ORT's SimplifiedLayerNormalization) keep the type of their data input.
    """
    if not any(node.op_type in QDQ for node in model.graph):
        raise OnnxqError(
            "the model has no QuantizeLinear/DequantizeLinear nodes: it is not a QDQ model",
            "quantize it first (onnxq quantize MODEL -o OUT), then check OUT/model.qdq.onnx",
        )
    if any(v.dtype is None for node in model.graph for v in node.outputs):
        from onnx_ir.passes.common import ShapeInferencePass

        model = ShapeInferencePass()(model).model
        for node in model.graph:  # ops ONNX does not know (ORT's norms): the type of their data input
            for value in node.outputs:
                if value.dtype is None and node.inputs and node.inputs[0] is not None:
                    value.dtype = node.inputs[0].dtype
    findings = [f for fn in RULES.values() for f in fn(model.graph)]
    if encodings is not None:
        findings += list(check_encodings(model.graph, encodings))
    seen: set[tuple[str, str]] = set()
    unique = []
    for f in findings:
        if (f.rule, f.tensor) not in seen:
            seen.add((f.rule, f.tensor))
            unique.append(f)
    return unique
