"""Export: static shapes, a finite mask, and logits equal to transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

from onnxq.core.errors import OnnxqError
from onnxq.stages.export import export, export_model
from tests.tiny import tiny_llama

# (shape, measured max |onnx - torch| when written)
SHAPES = [
    ({"hidden": 64, "heads": 4, "kv_heads": 2}, 2e-6),  # GQA
    ({"hidden": 96, "heads": 6, "kv_heads": 6, "intermediate": 160}, 2e-6),  # MHA, non-power-of-two
    ({"hidden": 48, "heads": 3, "kv_heads": 1, "layers": 3, "tied": False}, 2e-6),  # MQA, untied
]


@pytest.mark.parametrize(("shape", "measured"), SHAPES)
def test_export_matches_transformers(tmp_path: Path, shape: dict, measured: float) -> None:
    model = tiny_llama(**shape)
    result = export_model(model, tmp_path / "model.onnx", seq_len=32)
    assert result.max_abs_diff < 1e-4, f"measured {measured:g} when written"
    graph = ir.load(tmp_path / "model.onnx").graph
    assert [int(d) for d in graph.inputs[0].shape] == [1, 32]
    assert [int(d) for d in graph.outputs[0].shape] == [1, 32, model.config.vocab_size]


def test_export_has_no_huge_mask_constant(tiny_model: Path) -> None:
    model = ir.load(tiny_model)
    lowest = min(
        float(v.const_value.numpy().min())
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype.is_floating_point()
    )
    assert lowest >= -100.0  # the finite mask; transformers would fold -3.4e38 here
    assert model.metadata_props["onnxq.mask_value"] == "-100.0"


def test_exported_graph_runs_in_ort_like_torch(tiny_model: Path, eval_ids: np.ndarray) -> None:
    import onnxruntime as ort

    from tests.tiny import tiny_llama as again

    got = ort.InferenceSession(str(tiny_model)).run(None, {"input_ids": eval_ids[:1]})[0]  # batch 1
    with torch.no_grad():
        want = again().eval()(torch.as_tensor(eval_ids[:1])).logits.numpy()
    assert np.abs(got - want).max() < 1e-4


def test_export_refuses_existing_output(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"")
    with pytest.raises(OnnxqError, match="already exists"):
        export("some/model", target)


def test_export_wants_an_onnx_path(tmp_path: Path) -> None:
    with pytest.raises(OnnxqError, match=r"should end in \.onnx"):
        export(None, tmp_path / "model.bin")


def test_a_long_window_keeps_its_mask_a_constant_so_each_layer_stands_alone(tmp_path: Path) -> None:
    """At 1536 tokens the causal mask has 2.4M elements, above the optimizer's default fold limit; it
    must still be folded, or every decoder layer reads it from outside itself and the by-layer passes
    (GPTQ, sensitivity, learning) fall back to whole-graph runs."""
    from calib.layers import standing_layers
    from calib.mirror import Mirror
    from onnxq.stages.prepare import prepare

    seq = 1536
    export_model(tiny_llama(), tmp_path / "model.onnx", seq_len=seq, check=False)
    model = ir.load(tmp_path / "model.onnx")
    masks = [v for v in model.graph.initializers.values() if list(v.shape or ()) == [1, 1, seq, seq]]
    assert len(masks) == 1 and float(masks[0].const_value.numpy().min()) == -100.0
    assert not [n.op_type for n in model.graph if n.op_type in ("Where", "Equal", "LessOrEqual")]
    prepared = prepare(model)
    ranges = standing_layers(Mirror(prepared.model), prepared.structure)
    assert ranges is not None and len(ranges) == 2


def test_folding_leaves_a_large_weight_to_the_quantizer() -> None:
    """The Transpose of a tied weight above 2M elements (read by a Gather too, as a tied lm_head is)
    stays a node: untying is the quantizer's decision. A constant subgraph of any size that reads no
    weight is folded."""
    from onnx import TensorProto, helper

    from rewrites.canonical import fold_constants
    from tests.conftest import float_graph

    rows, cols, seq = 64, (1 << 21) // 64 + 1, 1536
    weight = helper.make_tensor("w", TensorProto.FLOAT, [cols, rows], np.zeros(rows * cols, np.float32))
    length = helper.make_tensor("n", TensorProto.INT64, [], [seq])
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["hw"]),
        helper.make_node("Gather", ["w", "zero"], ["row"]),  # the embedding's read of the same weight
        helper.make_node("ReduceSum", ["row"], ["rowsum"], keepdims=0),
        helper.make_node("Add", ["hw", "rowsum"], ["h"]),
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax"], ["col"]),
        helper.make_node("LessOrEqual", ["r", "col"], ["causal"]),  # [S, S]
        helper.make_node("Where", ["causal", "zerof", "low"], ["mask"]),
        helper.make_node("ReduceSum", ["mask"], ["total"], keepdims=0),
        helper.make_node("Add", ["h", "total"], ["y"]),
    ]
    inits = [
        weight,
        length,
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zerof", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("low", TensorProto.FLOAT, [], [-100.0]),
    ]
    model = ir.from_proto(float_graph(nodes, inits, ("x", [1, rows]), ("y", [1, cols])))
    fold_constants(model)
    ops = [n.op_type for n in model.graph]
    assert ops == ["Transpose", "MatMul", "Gather", "ReduceSum", "Add", "Add"], ops
    total = model.graph.node(5).inputs[1].const_value.numpy()
    assert float(total) == -100.0 * (seq * (seq - 1) // 2)  # the mask's strictly upper half


def test_layers_that_read_a_shared_value_are_reported(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Where the mask is computed at run time (here: passed through an Identity), every layer reads
    it from outside itself; the by-layer passes fall back to the whole graph, and say why."""
    from calib.layers import standing_layers
    from calib.mirror import Mirror
    from onnxq.stages.prepare import prepare

    prepared = prepare(ir.load(tiny_model))
    graph = prepared.model.graph
    assert standing_layers(Mirror(prepared.model), prepared.structure) is not None
    mask = next(v for v in graph.initializers.values() if v.name.endswith(".gqa"))
    computed = ir.Value(name="mask.computed", type=mask.type, shape=mask.shape)
    for use in list(mask.uses()):
        use.node.replace_input_with(use.idx, computed)
    graph.insert_before(next(iter(graph)), ir.node("Identity", [mask], outputs=[computed]))
    with caplog.at_level("WARNING", logger="calib.layers"):
        assert standing_layers(Mirror(prepared.model), prepared.structure) is None
    assert "layer 0 reads ['mask.computed'] from outside itself" in caplog.text
