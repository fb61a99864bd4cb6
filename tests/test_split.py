"""A QDQ model = a float model + encodings (what QAIRT's converter takes), exactly, both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.core.errors import OnnxqError
from onnxq.device.qnn import cpu_session
from onnxq.stages import aimet
from onnxq.stages.split import join, split


def _quantizers(model: ir.Model) -> list[tuple[str, tuple[float, ...], tuple[int, ...]]]:
    """Every QuantizeLinear/DequantizeLinear's (type, scales, zero points), sorted: the quantization as a set."""
    out = []
    for n in model.graph:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = n.inputs[2].const_value
            out.append(
                (
                    f"{n.op_type}:{zp.dtype}",
                    tuple(np.asarray(n.inputs[1].const_value.numpy(), dtype=np.float32).reshape(-1).tolist()),
                    tuple(np.asarray(zp.numpy()).astype(np.int64).reshape(-1).tolist()),
                )
            )
    return sorted(out)


def _run(model: ir.Model, path: Path, ids: np.ndarray) -> np.ndarray:
    ir.save(model, path)
    sess = cpu_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: ids})[0]


@pytest.mark.parametrize("fixture", ["tiny_w8a16", "tiny_w8a8"])
def test_float_plus_encodings_rebuild_the_qdq_model(
    fixture: str, request: pytest.FixtureRequest, eval_ids: np.ndarray, tmp_path: Path
) -> None:
    qdq_path = request.getfixturevalue(fixture) / "model.qdq.onnx"
    parts = split(ir.load(qdq_path))
    ops = {n.op_type for n in parts.model.graph}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert all(v.dtype == ir.DataType.FLOAT for v in parts.model.graph.initializers.values() if v.name in parts.params)
    # through the AIMET file and back, in both formats
    for version in aimet.VERSIONS:
        enc_file = tmp_path / f"model.{version}.encodings"
        aimet.write_tensors(parts.activations, parts.params, enc_file, version)
        acts, params = aimet.read_split(enc_file)
        rebuilt = join(split(ir.load(qdq_path)).model, acts, params)
        original = ir.load(qdq_path)
        assert _quantizers(rebuilt) == _quantizers(original)
        ids = eval_ids[:1]
        np.testing.assert_array_equal(
            _run(rebuilt, tmp_path / "rebuilt.onnx", ids), _run(original, tmp_path / "o.onnx", ids)
        )


def test_quantize_writes_the_aimet_file_of_its_model(tiny_w8a8: Path) -> None:
    acts, params = aimet.read_split(tiny_w8a8 / "model.encodings")
    parts = split(ir.load(tiny_w8a8 / "model.qdq.onnx"))
    assert set(acts) == set(parts.activations) and set(params) == set(parts.params)
    for name, enc in {**acts, **params}.items():
        ref = {**parts.activations, **parts.params}[name]
        assert enc.qtype == ref.qtype, name
        np.testing.assert_array_equal(enc.scale, ref.scale)
        np.testing.assert_array_equal(enc.zero_point, ref.zero_point)


def test_encodings_for_another_model_are_refused(tiny_w8a16: Path) -> None:
    parts = split(ir.load(tiny_w8a16 / "model.qdq.onnx"))
    with pytest.raises(OnnxqError, match="tensors the model lacks"):
        join(parts.model, {"no_such_tensor": next(iter(parts.activations.values()))}, {})
