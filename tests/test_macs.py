"""MAC shares by operand width: counted from shapes and the Q/DQ pairs in front of each MatMul."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.stages.macs import mac_widths
from tests.conftest import float_graph


def _two_matmuls() -> onnx.ModelProto:
    """x [1,4,8] -> Q/DQ uint8 -> MatMul with a DQ'd int4 weight [8,3] -> MatMul with a float [3,5]."""
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        helper.make_tensor("wq", TensorProto.INT4, [8, 3], [1] * 24),
        numpy_helper.from_array(np.array(0.05, np.float32), "ws"),
        numpy_helper.from_array(np.ones((3, 5), np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["h"], name="fc"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="plain"),
    ]
    return float_graph(nodes, inits, ("x", [1, 4, 8]), ("y", [1, 4, 5]))


def test_shares_follow_the_shapes_and_widths() -> None:
    shares = mac_widths(_two_matmuls())
    # fc: 4 x 8 x 3 = 96 MACs, a8 x w4; plain: 4 x 3 x 5 = 60, float
    assert shares == {
        "a8 x w4": pytest.approx(100 * 96 / 156, abs=0.01),
        "float x float": pytest.approx(100 * 60 / 156, abs=0.01),
    }


def test_dynamic_shapes_are_refused() -> None:
    model = _two_matmuls()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    with pytest.raises(ValueError, match="no static input shapes"):
        mac_widths(model)


def test_quantize_reports_where_the_work_runs(tiny_w8a16: Path, tiny_w8a8: Path) -> None:
    """W8A16: every FC reads 16-bit activations; W8A8: the FCs' 8-bit inputs carry most of the work."""
    a16 = json.loads((tiny_w8a16 / "summary.json").read_text())["macs"]
    assert sum(a16.values()) == pytest.approx(100, abs=0.05)
    assert a16["a16 x w8"] > 50 and set(a16) <= {"a16 x w8", "a16 x a16"}
    a8 = json.loads((tiny_w8a8 / "summary.json").read_text())["macs"]
    assert sum(a8.values()) == pytest.approx(100, abs=0.05)
    assert max(a8, key=a8.__getitem__) == "a8 x w8"
