"""onnxq diff: per-layer SQNR, the layer where the error jumps, and HTP-vs-CPU error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.evaluation.diff import diff
from onnxq.stages.pipeline import quantize
from tests.conftest import export_tiny


@pytest.fixture(scope="module")
def four_layers(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    float_path = export_tiny(tiny_dir, "four", layers=4)
    out = tmp_path_factory.mktemp("diff") / "w8a16"
    quantize(float_path, out, preset="w8a16", calib="wikitext2-valid", windows=4)
    return float_path, out / "model.qdq.onnx"


def _plant(qdq: Path, layer: int, target: Path) -> None:
    """Shrink the range of layer ``layer``'s down_proj input 50x: heavy clipping there."""
    model = ir.load(qdq)
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and node.inputs[0].name.startswith(f"model.layers.{layer}.mlp.mul"):
            scale = node.inputs[1]
            scale.const_value = ir.tensor(scale.const_value.numpy() / 50, name=scale.name)
    ir.save(model, target)


def test_clean_model_has_no_jump_and_sane_numbers(four_layers: tuple[Path, Path], eval_ids: np.ndarray) -> None:
    float_path, qdq = four_layers
    report = diff(float_path, qdq, eval_ids[:1])
    rows = report.layers()
    assert [r["layer"] for r in rows] == [0, 1, 2, 3, None]
    assert all(row["resid_mlp"] > 20 for row in rows[:4])  # dB; measured 33-40 at w8a16
    assert report.first_jump is None


@pytest.mark.parametrize("layer", [1, 2])
def test_planted_fault_is_found(
    four_layers: tuple[Path, Path], eval_ids: np.ndarray, tmp_path: Path, layer: int
) -> None:
    float_path, qdq = four_layers
    _plant(qdq, layer, tmp_path / "faulty.onnx")
    report = diff(float_path, tmp_path / "faulty.onnx", eval_ids[:1])
    assert report.first_jump is not None and report.first_jump["layer"] == layer
    assert report.most_clipped[0]["layer"] == layer and report.most_clipped[0]["kind"] == "down_in"


def test_htp_column(
    four_layers: tuple[Path, Path], eval_ids: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    float_path, qdq = four_layers
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = diff(float_path, qdq, eval_ids[:1], ep="qnn")
    assert list(tmp_path.iterdir()) == []  # its copies of both graphs are gone (a report per quantize)
    steps = [p.htp_steps for p in report.points if p.htp_steps is not None]
    assert steps and all(np.isfinite(steps))
    assert max(steps) < 5000  # output steps of 16-bit tensors; measured ~2000 on this random model
    graph = ir.load(qdq).graph
    quantizers = [n for n in graph if n.op_type == "QuantizeLinear" and n.inputs[0].const_value is None]
    assert len(report.ops) == len(quantizers)
    # each op fed the HTP's own inputs: its 16-bit Sigmoid is off by up to 4 steps, the rest by rounding
    assert max(o.max_steps / 2 ** (o.bits - 8) for o in report.ops) < 0.05  # 8-bit steps; measured 0.02
    assert report.ops[0].op == "Sigmoid"
