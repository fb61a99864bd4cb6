"""Qwen2 (biases on q/k/v) and Qwen3 (per-head q_norm and k_norm) through the Llama path: exact
rewrites, whole on the HTP, and a KV pair that computes what their scoring graph computes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.core.errors import OnnxqError
from onnxq.device.check import run_checks
from onnxq.device.generate import Stepper
from onnxq.device.qnn import cpu_session
from onnxq.device.validation import validate
from onnxq.stages.pipeline import quantize
from onnxq.stages.prepare import prepare
from rewrites.structure import discover
from tests.conftest import export_tiny, worst_by_op
from tests.test_outliers import MASSIVE

FAMILIES = ("qwen2", "qwen3")
#: top-1 of the HTP against ONNX Runtime CPU on the same QDQ graph; measured 0.80-1.0 (these random
#: models' logits are near-tied, and an FC's rounding on the HTP differs from the CPU's by a code)
MIN_TOP1 = 0.75


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_model(tiny_dir: Path, family: str) -> Path:
    """The family's tiny model with test_outliers' planted massive channel (export checks < 1e-4 vs transformers)."""
    return export_tiny(tiny_dir, f"{family}-massive", family=family, massive=MASSIVE)


def test_the_family_is_found_as_a_llama(family_model: Path, family: str) -> None:
    model = prepare(ir.load(family_model), rotate="none").model
    structure = discover(model)
    assert len(structure.layers) == 2 and structure.hidden_size == 64
    biases = [lin.bias for layer in structure.layers for lin in (layer.attn.q, layer.attn.k, layer.attn.v)]
    assert all(biases) == (family == "qwen2") and any(biases) == (family == "qwen2")
    head_norms = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization" and ".q_norm" in n.name]
    assert len(head_norms) == (2 if family == "qwen3" else 0)


def test_the_whole_recipe_is_exact_in_float(family_model: Path, tmp_path: Path, eval_ids: np.ndarray) -> None:
    """R1 + R2 (the v bias rotates with v), R3 + R4 and an outlier split leave the float model unchanged."""
    prepared = prepare(ir.load(family_model), online=("r3", "r4"), outliers=lambda *_: {0: [MASSIVE, 7], 1: [5, 9]})
    assert {r.name: r.counts for r in prepared.rewrites}["outlier channels"] == {"layers": 2, "channels": 4}
    ir.save(prepared.model, tmp_path / "rewritten.onnx")
    want = cpu_session(family_model).run(None, {"input_ids": eval_ids[:1]})[0]
    got = cpu_session(tmp_path / "rewritten.onnx").run(None, {"input_ids": eval_ids[:1]})[0]
    assert np.abs(got - want).max() < 1e-4  # float32 on ORT; measured 2e-6 (qwen2), 3e-6 (qwen3)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_the_default_recipe_runs_whole_on_the_htp(
    family_model: Path, tmp_path: Path, eval_ids: np.ndarray, preset: str
) -> None:
    """Whole on the HTP, and each op there computes what the reference op computes from the HTP's own inputs."""
    out = tmp_path / preset
    quantize(family_model, out, preset=preset, calib="wikitext2-valid", windows=4)
    assert not run_checks(ir.load(out / "model.qdq.onnx"))
    report = validate(out / "model.qdq.onnx", eval_ids[:1])
    assert report.nodes_on_qnn == report.nodes_total > 0
    assert report.top1_agreement > MIN_TOP1
    worst = max(worst_by_op(out / "model.qdq.onnx", eval_ids[:1]).values())
    assert worst <= 1.0  # 8-bit steps; measured 1 (an FC's rounding) for both families and presets


def test_a_head_norm_reading_8_bits_is_widened_for_the_htp(
    tiny_dir: Path, tmp_path: Path, eval_ids: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3's q_norm reads the 8-bit q_proj output; without the convert to 16 bits the HTP refuses the graph."""
    from onnxq import plan

    source = export_tiny(tiny_dir, "qwen3-massive", family="qwen3", massive=MASSIVE)
    monkeypatch.setattr(plan, "_widen_8bit_reads", lambda *_: [])
    out = tmp_path / "unwidened"
    quantize(source, out, preset="w8a8", calib="wikitext2-valid", windows=2)
    flagged = [f.tensor for f in run_checks(ir.load(out / "model.qdq.onnx")) if f.rule == "htp-norm-width"]
    assert len(flagged) == 4 and all(".q_norm" in name or ".k_norm" in name for name in flagged)
    with pytest.raises(OnnxqError, match="QNN EP could not load"):
        validate(out / "model.qdq.onnx", eval_ids[:1])


def test_the_pair_computes_what_the_scoring_graph_computes(
    tiny_dir: Path, family: str, tmp_path: Path, eval_ids: np.ndarray
) -> None:
    from onnxq.stages.export_kv import export_kv_model
    from tests.tiny import tiny_llama

    folder = tmp_path / "pair"
    model = tiny_llama(family=family, massive=MASSIVE)
    result = export_kv_model(model, folder, chunk=8, context=40, check_ids=np.arange(21) * 7 % 384, seq_len=64)
    assert result.max_abs_diff < 1e-4  # float32 noise between two graphs of the same model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, folder / name)
    out = tmp_path / "w4a8"
    quantize(folder, out, preset="w4a8", calib="wikitext2-valid", windows=4)
    scoring = cpu_session(out / "model.qdq.onnx")
    for window in eval_ids:
        want = scoring.run(None, {"input_ids": window.reshape(1, -1)})[0][0][:40]
        stepper = Stepper(out)
        got = np.concatenate([stepper.step(window[:19]), *(stepper.step([t]) for t in window[19:40])])
        # measured 0.0 (the same integer codes); the bound leaves another CPU's float order in the 16-bit ops
        assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
