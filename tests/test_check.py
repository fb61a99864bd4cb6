"""onnxq check: every finding is planted in a tiny model and reported; a clean model passes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.cli import main
from onnxq.device.check import run_checks


def _load(folder: Path) -> ir.Model:
    return ir.load(folder / "model.qdq.onnx")


def _first(graph: ir.Graph, pred: Callable[[ir.Node], bool]) -> ir.Node:
    return next(n for n in graph if pred(n))


def _rules(model: ir.Model, encodings: Path | None = None) -> set[str]:
    return {f.rule for f in run_checks(model, encodings)}


def test_onnxq_models_are_clean(tiny_w8a16: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for folder in (tiny_w8a16, tiny_w8a8):
        for enc in ("encodings.json", "model.encodings"):  # onnxq's and AIMET's
            assert main(["check", str(folder / "model.qdq.onnx"), "--encodings", str(folder / enc)]) == 0
    assert "no findings" in capsys.readouterr().out


def _act_q(graph: ir.Graph, op: str) -> ir.Node:
    """The QuantizeLinear right after the first ``op``."""
    node = _first(graph, lambda n: n.op_type == op)
    return next(u.node for u in node.outputs[0].uses() if u.node.op_type == "QuantizeLinear")


def _set_scale(node: ir.Node, value: float) -> None:
    scale = node.inputs[1]
    fresh = ir.Value(name=f"{scale.name}.planted", const_value=ir.tensor(np.array(value, dtype=np.float32)))
    node.graph.register_initializer(fresh)
    node.replace_input_with(1, fresh)


def test_unquantized_tensor(tiny_w8a16: Path) -> None:
    model = _load(tiny_w8a16)
    q = _act_q(model.graph, "Softmax")
    dq = next(u.node for u in q.outputs[0].uses())
    dq.outputs[0].replace_all_uses_with(q.inputs[0])  # bypass the pair: Softmax output reaches MatMul in float
    assert "unquantized" in _rules(model)


def test_float_int_matmul_and_unquantized(tiny_w8a16: Path) -> None:
    model = _load(tiny_w8a16)
    mm = _first(model.graph, lambda n: n.op_type == "MatMul")
    dq = mm.inputs[0].producer()
    q = dq.inputs[0].producer()
    mm.replace_input_with(0, q.inputs[0])
    assert {"float-int-matmul", "unquantized"} <= _rules(model)


def test_qdq_pair_with_different_scales(tiny_w8a16: Path) -> None:
    model = _load(tiny_w8a16)
    q = _act_q(model.graph, "Sigmoid")
    _set_scale(next(u.node for u in q.outputs[0].uses()), 0.123)
    assert "qdq-mismatch" in _rules(model)


def test_reshape_that_changes_scale(tiny_w8a16: Path) -> None:
    model = _load(tiny_w8a16)
    _set_scale(_act_q(model.graph, "Reshape"), 0.5)
    assert "shared-scale" in _rules(model)


def test_zero_scale(tiny_w8a16: Path) -> None:
    model = _load(tiny_w8a16)
    _set_scale(_act_q(model.graph, "Sigmoid"), 0.0)
    assert "bad-range" in _rules(model)


def test_fc_with_two_widths_and_wide_int8_weights(tiny_w8a8: Path) -> None:
    model = _load(tiny_w8a8)
    graph = model.graph
    fc = _first(
        graph,
        lambda n: (
            n.op_type == "MatMul"
            and n.inputs[1].producer().inputs[0].is_initializer()
            and n.inputs[0].producer().inputs[2].const_value.dtype == ir.DataType.UINT8
        ),
    )
    out_q = next(u.node for u in fc.outputs[0].uses())
    wide = ir.Value(name="planted_u16_zp", const_value=ir.tensor(np.array(0, dtype=np.uint16)))
    graph.register_initializer(wide)
    out_q.replace_input_with(2, wide)
    w = fc.inputs[1].producer().inputs[0]
    w.const_value = ir.tensor(np.full(w.const_value.shape.numpy(), 100, dtype=np.int8), name=w.name)
    rules = _rules(model)
    assert {"width-meets", "htp-int8-range"} <= rules


def test_signed_fc_output(tiny_w8a16: Path) -> None:
    model = _load(tiny_w8a16)
    fc = _first(model.graph, lambda n: n.op_type == "MatMul" and n.inputs[1].producer().inputs[0].is_initializer())
    out_q = next(u.node for u in fc.outputs[0].uses())
    signed = ir.Value(name="planted_i16_zp", const_value=ir.tensor(np.array(0, dtype=np.int16)))
    model.graph.register_initializer(signed)
    out_q.replace_input_with(2, signed)
    assert "htp-signed-fc" in _rules(model)


def test_encodings_that_miss_or_invent_tensors(tiny_w8a16: Path, tmp_path: Path) -> None:
    data = json.loads((tiny_w8a16 / "encodings.json").read_text())
    name = next(iter(data["points"]))
    data["points"][name]["tensors"] = []
    data["points"]["ghost"] = {"dtype": "uint8", "scale": 1.0, "zero_point": 0, "tensors": ["ghost"]}
    bad = tmp_path / "encodings.json"
    bad.write_text(json.dumps(data))
    assert {"encodings-missing", "encodings-extra"} <= _rules(_load(tiny_w8a16), bad)


def test_decomposed_norm_and_folded_mask_from_onnxruntime(tiny_dir: Path, tmp_path: Path) -> None:
    """ONNX Runtime's QNN quantizer on a graph with transformers' -3.4e38 mask is flagged for it."""
    from transformers import AutoTokenizer

    from calib.data import windows
    from onnxq.stages.export import export_model
    from tests.tiny import tiny_llama
    from tools.ort_baseline import quantize_with_ort

    export_model(tiny_llama(), tmp_path / "model.onnx", seq_len=64, mask_value=float(np.finfo(np.float32).min))
    ids = windows(AutoTokenizer.from_pretrained(tiny_dir), "wikitext2-valid", 64, 2).ids
    quantize_with_ort(tmp_path / "model.onnx", tmp_path / "ort.qdq.onnx", ids, "w8a16")
    findings = run_checks(ir.load(tmp_path / "ort.qdq.onnx"))
    assert any(f.rule == "huge-range" and "mask" in f.problem for f in findings)
    assert any(f.rule == "htp-norm" for f in findings)  # its decomposed RMSNorm
    assert main(["check", str(tmp_path / "ort.qdq.onnx")]) == 1


def test_signed_16bit_expand() -> None:
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Expand", ["xd", "shape"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.01]),
            helper.make_tensor("z", TensorProto.INT16, [], [0]),
            helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4]),
        ],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert _rules(model) == {"htp-expand16"}
