"""Outlier channels split off the MLP: exact in float, chosen from peaks, 16-bit on the HTP, and they help."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.core.errors import OnnxqError
from onnxq.device.qnn import cpu_session
from onnxq.device.validation import validate
from onnxq.stages.pipeline import quantize
from onnxq.stages.prepare import prepare
from rewrites.outliers import choose_channels
from tests.conftest import export_tiny

MASSIVE = 5  # the planted channel of layer 0 (tests.tiny.tiny_llama)


@pytest.fixture(scope="module")
def massive_model(tiny_dir: Path) -> Path:
    return export_tiny(tiny_dir, "massive", massive=MASSIVE)


@pytest.fixture(scope="module")
def split_w8a8(massive_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split") / "w8a8"
    quantize(massive_model, out, preset="w8a8", calib="wikitext2-valid", windows=4, split_outliers=16.0)
    return out


@pytest.mark.parametrize("online", [(), ("r4",)])
def test_split_is_exact_in_float(
    tiny_model: Path, tmp_path: Path, eval_ids: np.ndarray, online: tuple[str, ...]
) -> None:
    prepared = prepare(ir.load(tiny_model), online=online, outliers=lambda *_: {0: [3, 7], 1: [5]})
    assert {r.name: r.counts for r in prepared.rewrites}["outlier channels"] == {"layers": 2, "channels": 3}
    assert prepared.structure is not None and len(prepared.structure.layers) == 2  # still found
    ir.save(prepared.model, tmp_path / "split.onnx")
    want = cpu_session(tiny_model).run(None, {"input_ids": eval_ids[:1]})[0]
    got = cpu_session(tmp_path / "split.onnx").run(None, {"input_ids": eval_ids[:1]})[0]
    assert np.abs(got - want).max() < 1e-4  # float32 on ORT; measured ~4e-6


def test_channels_are_chosen_by_peak_over_the_median() -> None:
    peaks = np.ones(100)
    peaks[[7, 40, 41]] = [50.0, 20.0, 10.0]
    assert choose_channels(peaks, ratio=16, limit=8) == [7, 40]
    assert choose_channels(peaks, ratio=30, limit=8) == [7, 40]  # a lone channel takes the next largest along
    assert choose_channels(peaks, ratio=16, limit=1) == [7, 40]
    assert choose_channels(np.full(100, 3.0), ratio=16, limit=8) == []
    peaks[3] = np.nan
    with pytest.raises(OnnxqError, match="not finite"):
        choose_channels(peaks, ratio=16, limit=8)


def test_split_finds_the_massive_channel_and_keeps_it_at_16_bits(split_w8a8: Path) -> None:
    summary = json.loads((split_w8a8 / "summary.json").read_text())
    assert any(f"layer 0: {MASSIVE}" in note for note in summary["notes"])
    points = json.loads((split_w8a8 / "precision_map.json").read_text())["points"]
    side = {k: v for k, v in points.items() if v["role"] == "outliers" or ".outliers" in k}
    assert side and all(v["bits"] >= 8 for v in side.values())
    assert all(v["bits"] == 16 for v in side.values() if v["kind"] == "act")


def test_split_cuts_the_w8a8_error(massive_model: Path, tmp_path: Path, eval_ids: np.ndarray) -> None:
    """The split alone: without R4 and GPTQ (the a8 defaults), which also lower the error."""
    alone = {"preset": "w8a8", "calib": "wikitext2-valid", "windows": 4, "online_hadamard": (), "weight_method": "mse"}
    plain, split = tmp_path / "plain", tmp_path / "split"
    quantize(massive_model, plain, split_outliers=0.0, **alone)
    quantize(massive_model, split, split_outliers=16.0, **alone)
    assert not any("side path" in note for note in json.loads((plain / "summary.json").read_text())["notes"])

    def logits(path: Path) -> np.ndarray:
        session = cpu_session(path)
        return np.concatenate([session.run(None, {"input_ids": w[None]})[0] for w in eval_ids])

    want = logits(massive_model)

    def rel_error(folder: Path) -> float:
        got = logits(folder / "model.qdq.onnx")
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    assert rel_error(split) < 0.5 * rel_error(plain)  # measured 0.145 vs 0.408


def test_split_is_the_a8_default_of_the_llama_recipe(massive_model: Path, split_w8a8: Path, tmp_path: Path) -> None:
    """Without --split-outliers, an 8-bit preset splits at the recipe's ratio (16): the same bytes."""
    out = tmp_path / "default"
    quantize(massive_model, out, preset="w8a8", calib="wikitext2-valid", windows=4)
    assert (out / "model.qdq.onnx").read_bytes() == (split_w8a8 / "model.qdq.onnx").read_bytes()


def test_split_model_runs_whole_on_the_htp(split_w8a8: Path, eval_ids: np.ndarray) -> None:
    report = validate(split_w8a8 / "model.qdq.onnx", eval_ids[:1])
    assert report.nodes_on_qnn == report.nodes_total > 0
    # HTP vs ORT CPU on the same QDQ model. Measured on this model: split 0.906 top-1, 15,987 output
    # steps; without the split 0.703 and 34,788 (test_qnn's model, without a massive channel: < 10,000)
    assert report.top1_agreement > 0.75
    assert report.error_in_steps is not None and report.error_in_steps < 25000


def test_split_with_r4_runs_whole_on_the_htp(massive_model: Path, tmp_path: Path, eval_ids: np.ndarray) -> None:
    """The combination the bench's best W8A8 uses: side path, R4 at 16 bits (as 16 x 8 blocks), 8-bit down input."""
    out = tmp_path / "w8a8-r4"
    quantize(
        massive_model,
        out,
        preset="w8a8",
        calib="wikitext2-valid",
        windows=4,
        split_outliers=16.0,
        online_hadamard=("r4",),
    )
    report = validate(out / "model.qdq.onnx", eval_ids[:1])
    assert report.nodes_on_qnn == report.nodes_total > 0
    assert report.top1_agreement > 0.75  # measured 0.844 top-1, 15,579 steps, 417 of 417 nodes
    assert report.error_in_steps is not None and report.error_in_steps < 25000


def test_split_ratio_must_exceed_one(tiny_model: Path, tmp_path: Path) -> None:
    for ratio in (0.5, -1.0):
        with pytest.raises(OnnxqError, match="not above 1"):
            quantize(tiny_model, tmp_path / "q", preset="w8a8", split_outliers=ratio)
