"""Structure discovery by pattern, on several shapes, and a clear refusal otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from rewrites.structure import StructureError, discover, tensor_roles
from tests.conftest import export_tiny


@pytest.mark.parametrize(
    ("name", "shape", "heads", "kv"),
    [
        ("gqa", {}, 4, 2),
        ("mha96", {"hidden": 96, "heads": 6, "kv_heads": 6, "intermediate": 160}, 6, 6),
        ("mqa3", {"hidden": 48, "heads": 3, "kv_heads": 1, "layers": 3, "tied": False}, 3, 1),
    ],
)
def test_discover_finds_every_part(tiny_dir: Path, name: str, shape: dict, heads: int, kv: int) -> None:
    model = ir.load(export_tiny(tiny_dir, name, **shape))
    found = discover(model)
    layers = shape.get("layers", 2)
    assert len(found.layers) == layers and len(found.norms()) == 2 * layers + 1
    attn = found.layers[0].attn
    assert (attn.num_heads, attn.num_kv_heads) == (heads, kv)
    assert found.layers[0].mlp.act == "silu"
    roles = tensor_roles(model, found)
    kinds = {r.kind for r in roles.values()}
    assert {"attn_in", "q", "k", "v", "softmax_in", "probs", "down_in", "residual", "logits"} <= kinds


def test_a_graph_without_transformer_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8])],
        [
            helper.make_tensor("E", TensorProto.FLOAT, [8, 4], np.ones(32)),
            helper.make_tensor("W", TensorProto.FLOAT, [4, 8], np.ones(32)),
        ],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(StructureError, match="no RMSNorm reads the residual stream"):
        discover(model)


def test_layernorm_is_not_taken_for_rmsnorm(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "input_ids"], ["h"]),
            helper.make_node("LayerNormalization", ["h", "g"], ["n"], axis=-1),
            helper.make_node("MatMul", ["n", "W"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 8])],
        [
            helper.make_tensor("E", TensorProto.FLOAT, [8, 8], np.ones(64)),
            helper.make_tensor("g", TensorProto.FLOAT, [8], np.ones(8)),
            helper.make_tensor("W", TensorProto.FLOAT, [8, 8], np.ones(64)),
        ],
    )
    del x
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(StructureError, match="LayerNormalization, not an RMSNorm"):
        discover(model)
