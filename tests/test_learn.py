"""Learning (issue: the torch mirror): it helps, it writes back what it learned, it resumes, it repeats."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch

from calib.calibrate import calibrate
from calib.data import windows
from calib.fakequant import WeightQuant
from calib.learn import LearnConfig, cayley, learn
from calib.qsim import _key
from onnxq.core import presets, recipes
from onnxq.device.qnn import cpu_session
from onnxq.device.validation import validate
from onnxq.plan import build_plan
from onnxq.stages.pipeline import quantize
from onnxq.stages.prepare import prepare
from onnxq.stages.qdq import emit_qdq

CONFIG = LearnConfig(steps=30, samples=8, seed=0)
#: the learned W4A8 run of these tests, repeated for determinism and resume: per-channel weights and
#: no outlier split, as the checkpoint that test_same_seed_same_bytes_and_resume builds by hand
LEARNED: dict[str, Any] = {
    "preset": "w4a8",
    "calib": "wikitext2-valid",
    "windows": 16,
    "learn": CONFIG,
    "weight_block": 0,
    "split_outliers": 0.0,
    "online_hadamard": (),  # as measured below; R4 leaves less to learn on this model (-4 %)
}


@pytest.fixture(scope="module")
def ppl_windows(tiny_dir: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    return windows(AutoTokenizer.from_pretrained(tiny_dir), "wikitext2", 64, 8).ids


@pytest.fixture(scope="module")
def learned_w4a8(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("learn") / "w4a8"
    # per-channel weights, as measured below (with LPBQ blocks the weights leave less to learn:
    # -4 % instead of -10 %; test_written_back_model_equals_the_mirror covers learning with blocks)
    quantize(tiny_model, out, **LEARNED)
    return out


def test_cayley_is_orthogonal() -> None:
    a = torch.randn(12, 12, dtype=torch.float64)
    q = cayley(a)
    assert torch.allclose(q @ q.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cayley(torch.zeros(5, 5, dtype=torch.float64)), torch.eye(5, dtype=torch.float64))


def test_learning_lowers_the_layer_error(learned_w4a8: Path) -> None:
    """Stage 1 must lower what it optimises: each layer's output error against the float model.

    (Perplexity on a random 2-layer model is too flat to rank methods; the SmolLM2 bench does that.)
    """
    layers = json.loads((learned_w4a8 / "summary.json").read_text())["learning"]["layers"]
    before = np.array([layer["eval_before"] for layer in layers])
    after = np.array([layer["eval"] for layer in layers])
    assert np.all(after <= before)  # a layer learning made worse is reverted
    assert after.sum() < 0.95 * before.sum()  # measured 0.170 vs 0.190 (-10 %) at seed 0, 30 steps


def _codes(weight: np.ndarray, scale: np.ndarray, point: Any) -> np.ndarray:
    """Integer codes of ``weight`` under a per-channel or per-block ``scale``."""
    spec = point.spec
    axis = spec.axis % weight.ndim
    if spec.block_size:
        full = np.repeat(scale, spec.block_size, axis=axis)
    else:
        full = scale.reshape([-1 if d == axis else 1 for d in range(weight.ndim)])
    return np.clip(np.rint(weight / full), spec.qmin, spec.qmax).astype(np.int64)


def test_written_back_model_equals_the_mirror(tiny_model: Path, tiny_dir: Path, ppl_windows: np.ndarray) -> None:
    """What learning wrote back is what its mirror learned: integer codes and encodings exactly, logits
    within the spread that float summation order alone gives through chained quantizers."""
    from transformers import AutoTokenizer

    prep = prepare(ir.load(tiny_model))
    plan = build_plan(prep.model, presets.get("w4a8"), recipes.get("llama"), prep.roles, prep.structure)
    cw = windows(AutoTokenizer.from_pretrained(tiny_dir), "wikitext2-valid", 64, 8).ids
    enc, _ = calibrate(prep.model, plan, cw)
    unlearned = ir.from_proto(ir.to_proto(prep.model))
    emit_qdq(unlearned, plan, enc)
    config = LearnConfig(steps=10, samples=4)
    notes: list[str] = []
    result = learn(
        prep.model, prep.structure, plan, enc, cw[:4], cw, config=config, progress=lambda _n, note: notes.append(note)
    )
    assert len(notes) == 2 and re.fullmatch(r"layer 1 error [0-9.e-]+ -> [0-9.e-]+", notes[1])  # the CLI bar's note
    # the learner's own mirror: the unrotated weights with each learned R2 applied in torch, its weight
    # quantizers set to the encodings as written (LPBQ block scales snapped to the two-level grid)
    sim = result.mirror
    assert sim is not None
    for point in plan.weight_points():
        sim.weights[_key(point.name)] = WeightQuant(
            point.spec, sim.effective_weight(point.name).detach(), result.encodings[point.name]
        )
    # exact: every weight's integer codes (learned rotation and clipping merged) and every activation's
    # scale and zero point
    with torch.no_grad():
        for point in plan.weight_points():
            written = result.model.graph.initializers[point.name].const_value.numpy()
            scale = np.asarray(result.encodings[point.name].scale, dtype=np.float32)
            mirror_scale = sim.wq(point.name).scale(sim.effective_weight(point.name)).numpy()
            mirrored = _codes(sim.effective_weight(point.name).numpy(), mirror_scale, point)
            assert np.array_equal(_codes(written, scale, point), mirrored), point.name
        for point in plan.points.values():
            if point.kind in ("act", "convert"):
                s, z = sim.act(point.name).scale_zero()
                e = result.encodings[point.name]
                assert np.float32(s) == np.float32(np.asarray(e.scale).reshape(-1)[0]), point.name
                assert int(z) == int(np.asarray(e.zero_point).reshape(-1)[0]), point.name
    emit_qdq(result.model, plan, result.encodings)
    folder = tiny_model.parent
    ir.save(result.model, folder / "learned.qdq.onnx")
    ir.save(unlearned, folder / "unlearned.qdq.onnx")
    learned_ort = cpu_session(folder / "learned.qdq.onnx", optimized=False)
    unlearned_ort = cpu_session(folder / "unlearned.qdq.onnx", optimized=False)
    diffs, lost = [], []
    for ids in ppl_windows:
        with torch.no_grad():
            simulated = sim(ids).numpy()
        diffs.append(np.abs(simulated - learned_ort.run(None, {"input_ids": ids[None]})[0]).mean())
        lost.append(np.abs(simulated - unlearned_ort.run(None, {"input_ids": ids[None]})[0]).mean())
    # Float summation order differs between torch and ONNX Runtime (and between CPUs) by an ulp; at a
    # value on a 16-bit rounding tie that is one 16-bit step, and where an 8-bit requantization's
    # boundary falls in that step, one 8-bit step, which then cascades through later layers. Measured
    # on 8 windows: 7 agree to one output step (mean |diff| 1e-6), 1 cascades from a single flip
    # (mean 0.008, max 0.128). A model without what was learned differs by mean 0.12-0.17. The bound
    # sits between: every window cascading passes, losing the learned state fails.
    assert float(np.mean(diffs)) < 0.03, diffs
    assert min(lost) > 0.05, lost  # the bound above can fail
    (folder / "learned.qdq.onnx").unlink()
    (folder / "unlearned.qdq.onnx").unlink()


def test_learned_model_runs_on_the_htp(learned_w4a8: Path, ppl_windows: np.ndarray) -> None:
    report = validate(learned_w4a8 / "model.qdq.onnx", ppl_windows[:1])
    assert report.nodes_on_qnn == report.nodes_total


def test_same_seed_same_bytes_and_resume(tiny_model: Path, learned_w4a8: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    quantize(tiny_model, again, **LEARNED)
    digest = lambda p: hashlib.sha256((p / "model.qdq.onnx").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(learned_w4a8)
    # an interrupted run leaves a checkpoint; a new run with the same settings resumes from it
    resumed = tmp_path / "resumed"
    ckpt = tmp_path / ".resumed.learn" / "checkpoint.pt"
    ckpt.parent.mkdir()
    prep = prepare(ir.load(tiny_model))
    per_channel = replace(recipes.get("llama"), weight_block=0)
    plan = build_plan(prep.model, presets.get("w4a8"), per_channel, prep.roles, prep.structure)
    from transformers import AutoTokenizer

    cw = windows(AutoTokenizer.from_pretrained(tiny_model.parent), "wikitext2-valid", 64, 16).ids
    enc, _ = calibrate(prep.model, plan, cw)
    learn(prep.model, prep.structure, plan, enc, cw[:8], cw, config=CONFIG, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=False)["layers_done"] == 2
    quantize(tiny_model, resumed, **LEARNED)
    assert digest(resumed) == digest(learned_w4a8)
    assert not ckpt.parent.exists()  # removed once the output is written


def test_learning_keeps_the_grids_the_htp_fixes(learned_w4a8: Path) -> None:
    """Stage 2 recalibrates the points stage 1 left; 16-bit Sigmoid/Softmax outputs keep the HTP's 1/65536 grid."""
    from onnxq.device.check import RULES

    graph = ir.load(learned_w4a8 / "model.qdq.onnx").graph
    fixed = [n for n in graph if n.op_type in ("Sigmoid", "Softmax")]
    assert fixed and not list(RULES["htp-fixed-grid"](graph))
