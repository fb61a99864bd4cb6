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
from calib.learn import LearnConfig, cayley, learn
from calib.qsim import QuantSim
from onnxq import presets, recipes
from onnxq.pipeline import prepare, quantize
from onnxq.plan import build_plan
from onnxq.qdq import emit_qdq
from onnxq.qnn import cpu_session, validate

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


def test_written_back_model_equals_the_mirror(tiny_model: Path, tiny_dir: Path, ppl_windows: np.ndarray) -> None:
    from transformers import AutoTokenizer

    prep = prepare(ir.load(tiny_model))
    plan = build_plan(prep.model, presets.get("w4a8"), recipes.get("llama"), prep.roles, prep.structure)
    cw = windows(AutoTokenizer.from_pretrained(tiny_dir), "wikitext2-valid", 64, 8).ids
    enc, _ = calibrate(prep.model, plan, cw)
    config = LearnConfig(steps=10, samples=4)
    notes: list[str] = []
    result = learn(
        prep.model, prep.structure, plan, enc, cw[:4], cw, config=config, progress=lambda _n, note: notes.append(note)
    )
    assert len(notes) == 2 and re.fullmatch(r"layer 1 error [0-9.e-]+ -> [0-9.e-]+", notes[1])  # the CLI bar's note
    sim = QuantSim(result.model, plan, result.encodings)  # the learned model, simulated
    with torch.no_grad():
        simulated = sim(ppl_windows[0]).numpy()
    emit_qdq(result.model, plan, result.encodings)
    path = Path(str(tiny_model).replace("model.onnx", "learned.qdq.onnx"))
    ir.save(result.model, path)
    onnx = cpu_session(path, optimized=False).run(None, {"input_ids": ppl_windows[:1]})[0]
    diff = np.abs(simulated - onnx)
    assert diff.max() < 0.01 * np.abs(onnx).max()  # float summation order only; measured ~1e-4
    path.unlink()


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
