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
